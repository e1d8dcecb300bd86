"""What reaches the top of the ``breakwater`` CLI said in a line: a bad setting, a Redis it cannot use."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape


def run_cli(app: Any, console: Console) -> None:
    """Run the Typer ``app``; a bad setting exits 2, a Redis that cannot be reached or used exits 1,
    each with one line on ``console``."""
    from pydantic import ValidationError
    from redis.exceptions import AuthenticationWrongNumberOfArgsError, InvalidResponse, NoPermissionError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from breakwater.settings_check import settings_error

    try:
        app()
    except ValidationError as exc:
        said = settings_error(exc)
        if said is None:
            raise
        _error(console, said)
        raise SystemExit(2) from None
    except RedisConnectionError as exc:  # refused, unresolvable, a wrong password (AuthenticationError)
        _error(console, f"cannot reach Redis: {exc}")
        raise SystemExit(1) from None
    except InvalidResponse as exc:  # an HTTP server, or anything else that does not speak RESP
        _error(console, f"the server at the Redis URL does not answer as Redis does ({exc}): is it Redis?")
        raise SystemExit(1) from None
    except AuthenticationWrongNumberOfArgsError as exc:  # AUTH user pass to a Redis before 6 (no ACL users)
        _error(console, f"Redis refused the login: {exc} (a username needs Redis 6 or later)")
        raise SystemExit(1) from None
    except NoPermissionError as exc:  # an ACL user without this command or these keys
        _error(console, f"Redis refused: {exc}")
        raise SystemExit(1) from None


def _error(console: Console, said: str) -> None:
    console.print(f"[red]error:[/red] {escape(said)}", soft_wrap=True)
