// js-example's chunk hook (world 0.3.0): numbers the lines of a streamed response body as they
// pass, for a log tail or a feed of events. It keeps the count across chunks in the instance,
// so it needs `isolation: per-request` (one instance per request); it holds a chunk that ends
// mid-line until the line is complete, so that a line split across chunks gets one number.
//
// config: {"prefix": "> "} (what goes between the number and the line; default ": ")

let prefix = ': ';
let line = 0;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export const filter = {
  init(config) {
    let settings;
    try {
      settings = JSON.parse(config || '{}');
    } catch (error) {
      throw `config is not JSON: ${error}`;
    }
    for (const key of Object.keys(settings)) {
      if (key !== 'prefix') {
        throw `unknown field: ${key}`;
      }
    }
    if (settings.prefix !== undefined) {
      if (typeof settings.prefix !== 'string') {
        throw 'prefix must be a string';
      }
      prefix = settings.prefix;
    }
    return { onRequest: false, onResponse: false, onLog: false, requestBody: false, responseBody: false };
  },
  onRequest(req) {
    return { tag: 'continue' };
  },
  onResponse(req, resp) {},
  onLog(req, summary) {},
};

export const describe = {
  describe() {
    const schema = {
      type: 'object',
      properties: { prefix: { type: 'string' } },
      additionalProperties: false,
    };
    return { name: 'js-chunks', version: '0.1.0', configSchema: JSON.stringify(schema) };
  },
};

export const chunks = {
  wantsChunks() {
    return { request: false, response: true };
  },
  onRequestChunk(chunk, endOfStream) {
    return { tag: 'pass' };
  },
  onResponseChunk(chunk, endOfStream) {
    const text = decoder.decode(chunk);
    if (text.length === 0) {
      return { tag: 'pass' };
    }
    if (!endOfStream && !text.endsWith('\n')) {
      return { tag: 'hold' };
    }
    const lines = text.split('\n');
    // A complete chunk ends with '\n': its last piece is empty, not a line.
    const last = lines.pop();
    const numbered = lines.map((l) => `${++line}${prefix}${l}\n`);
    if (last !== '') {
      numbered.push(`${++line}${prefix}${last}`);
    }
    return { tag: 'replace', val: encoder.encode(numbered.join('')) };
  },
};
