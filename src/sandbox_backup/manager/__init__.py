"""The backup manager: periodic jobs, event handlers, dispatch, tracking and cleanup."""
