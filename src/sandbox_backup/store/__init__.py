"""The manager's database: models, migrations and guarded repositories."""
