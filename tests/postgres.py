"""The machine's PostgreSQL for tests: a fresh database per use, dropped afterwards.

The server is found at HOMER_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/postgres,
trust authentication, as on the project's machines; `make test` starts Debian's PostgreSQL when
nothing answers there). A test that needs it and finds none skips, naming the address and why.

    from tests.postgres import fresh_database, postgres_problem
    if (why := postgres_problem()): pytest.skip(why)
    with fresh_database("homer_sweep") as db:
        db.url            # postgresql://postgres@127.0.0.1:5432/homer_sweep_1a2b3c4d (Optuna, psycopg2)
        db.asyncpg_url    # postgresql+asyncpg://... (PREFECT_API_DATABASE_CONNECTION_URL)
        db.at("10.77.0.1", 15432)  # the same database reached through another address
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, replace
from typing import Iterator
from urllib.parse import urlparse

ADMIN_URL = os.environ.get("HOMER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class Database:
    name: str
    host: str
    port: int
    user: str

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.name}"

    @property
    def asyncpg_url(self) -> str:
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{self.name}"

    def at(self, host: str, port: int) -> "Database":
        return replace(self, host=host, port=port)


def _admin():
    import psycopg2

    connection = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return connection


def postgres_problem() -> str | None:
    """None when PostgreSQL answers at ADMIN_URL; else why not (for pytest.skip)."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install 'recurrent-homer[postgres]')"
    try:
        _admin().close()
    except Exception as exc:  # psycopg2.OperationalError and friends
        return f"no PostgreSQL answers at {ADMIN_URL} ({str(exc).strip().splitlines()[0]}); `make postgres` starts one"
    return None


@contextlib.contextmanager
def fresh_database(prefix: str = "homer_test") -> Iterator[Database]:
    """CREATE DATABASE <prefix>_<random>; yield it; end its connections and DROP it."""
    address = urlparse(ADMIN_URL)
    db = Database(f"{prefix}_{secrets.token_hex(4)}", address.hostname or "127.0.0.1", address.port or 5432,
                  address.username or "postgres")
    admin = _admin()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{db.name}"')
        yield db
    finally:
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                           (db.name,))
            cursor.execute(f'DROP DATABASE IF EXISTS "{db.name}"')
        admin.close()
