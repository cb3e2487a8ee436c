"""Reading a JSON object that came from a file or an object store: the one way every reader here refuses bad input
(not JSON, not UTF-8, or JSON that is not an object), with the reader's own exception type and a message naming
where the text came from."""
from __future__ import annotations

import json
from typing import Any, Union


def load_object(raw: Union[str, bytes], where: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """``raw`` parsed as a JSON object; ``error(f"{where} ...")`` if it is not valid JSON or not an object."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise error(f"{where} must hold a JSON object, got {type(obj).__name__}")
    return obj
