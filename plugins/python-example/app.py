"""python-example: a sticky A/B split. Each user (named by a header) is assigned a variant once,
kept in the plugin's kv, and told to the upstream in a header."""

import json

from wit_world import exports
from wit_world.exports import filter
from wit_world.imports import http, kv, log
from componentize_py_types import Err


# Set by init. componentize-py makes a new Filter object for each call, so settings live in the
# module, which lasts as long as the instance.
SETTINGS = {"header": "x-user", "percent_b": 50}


def fnv1a(text: str) -> int:
    """A stable 32-bit hash (Python's own hash() is salted per process)."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


class Filter(exports.Filter):
    def init(self, config: str) -> filter.Wants:
        try:
            settings = json.loads(config or "{}")
        except ValueError as error:
            raise Err(f"config is not JSON: {error}")
        unknown = set(settings) - {"header", "percent_b"}
        if unknown:
            raise Err(f"unknown field(s): {', '.join(sorted(unknown))}")
        percent_b = settings.get("percent_b", 50)
        if not isinstance(percent_b, int) or not 0 <= percent_b <= 100:
            raise Err("percent_b must be a whole number from 0 to 100")
        SETTINGS["header"] = settings.get("header", "x-user")
        SETTINGS["percent_b"] = percent_b
        return filter.Wants(on_request=True, on_response=True, on_log=False,
                            request_body=False, response_body=False)

    def on_request(self, req: http.Request) -> http.Action:
        user = req.header(SETTINGS["header"]) or "anonymous"
        key = f"variant:{user}"
        stored = kv.get(key)
        if stored is None:
            # A hash of the user picks the bucket; the kv keeps the choice when percent_b changes.
            variant = "b" if fnv1a(user) % 100 < SETTINGS["percent_b"] else "a"
            kv.incr(f"assigned:{variant}", 1, None)
            kv.set(key, variant.encode(), None)
            log.write(log.Level.INFO, f"assigned {user} to variant {variant}")
        else:
            variant = stored.decode()
        req.set_header("x-ab-variant", variant)
        req.set_var("ab-variant", variant)
        return http.Action_Continue()

    def on_response(self, req: http.Request, resp: http.Response) -> None:
        resp.set_header("x-ab-variant", req.get_var("ab-variant") or "none")

    def on_log(self, req: http.Request, summary: http.Summary) -> None:
        pass
