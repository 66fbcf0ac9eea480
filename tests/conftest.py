"""Shared test set-up. Each real component has its own fixture module under tests/fixtures."""

pytest_plugins = [
    "tests.fixtures.databases",
    "tests.fixtures.redis",
    "tests.fixtures.registry",
    "tests.fixtures.podman",
    "tests.fixtures.manager",
    "tests.fixtures.live",
]
