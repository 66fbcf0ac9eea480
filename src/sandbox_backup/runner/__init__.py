"""The runner agent: serves the backup part of the Daytona runner API on one container engine.

`runner.app.create_app` builds the FastAPI app and `runner.app.serve` runs it;
`runner.client.RunnerClient` is the manager's client for it.
"""
