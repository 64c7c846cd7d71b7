"""python-example's chunk hook (world 0.3.0): masks words in a streamed response, such as an
LLM's answer sent as server-sent events, as it passes. It holds each chunk until it ends with a
blank line (the end of an SSE event) or the stream ends, so that a word split across two chunks
is still seen whole, then passes the event on with each configured word masked."""
import json

from wit_world import exports
from wit_world.exports import chunks, describe, filter
from componentize_py_types import Err

# Set by init; the module lasts as long as the instance.
WORDS: list[bytes] = []


class Filter(exports.Filter):
    def init(self, config: str) -> filter.Wants:
        try:
            settings = json.loads(config or "{}")
        except ValueError as error:
            raise Err(f"config is not JSON: {error}")
        words = settings.get("words", [])
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise Err("words must be a list of non-empty strings")
        WORDS[:] = [word.encode() for word in words]
        return filter.Wants(on_request=False, on_response=False, on_log=False,
                            request_body=False, response_body=False)

    def on_request(self, req):
        raise NotImplementedError("never called: wants no on-request")

    def on_response(self, req, resp) -> None:
        pass

    def on_log(self, req, summary) -> None:
        pass


class Describe(exports.Describe):
    def describe(self) -> describe.PluginInfo:
        schema = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"}}},
                  "additionalProperties": False}
        return describe.PluginInfo(name="python-chunks", version="0.1.0", config_schema=json.dumps(schema))


class Chunks(exports.Chunks):
    def wants_chunks(self) -> chunks.ChunkWants:
        return chunks.ChunkWants(request=False, response=True)

    def on_request_chunk(self, chunk: bytes, end_of_stream: bool) -> chunks.ChunkAction:
        return chunks.ChunkAction_Pass()

    def on_response_chunk(self, chunk: bytes, end_of_stream: bool) -> chunks.ChunkAction:
        if not end_of_stream and not chunk.endswith(b"\n\n"):
            return chunks.ChunkAction_Hold()
        masked = chunk
        for word in WORDS:
            masked = masked.replace(word, b"*" * len(word))
        if masked == chunk:
            return chunks.ChunkAction_Pass()
        return chunks.ChunkAction_Replace(masked)
