// js-example: redacts fields of a JSON response body (at any depth) before it reaches the client.
//
// config: {"fields": ["password", "ssn"], "replacement": "[redacted]"}

import { write } from 'weir:plugin/log@0.1.0';
import { incr } from 'weir:plugin/kv@0.1.0';

// Set by init; the module lives as long as the instance.
let fields = new Set(['password']);
let replacement = '[redacted]';

function redact(value, counter) {
  if (Array.isArray(value)) {
    return value.map((item) => redact(item, counter));
  }
  if (value !== null && typeof value === 'object') {
    const out = {};
    for (const [key, inner] of Object.entries(value)) {
      if (fields.has(key)) {
        out[key] = replacement;
        counter.count += 1;
      } else {
        out[key] = redact(inner, counter);
      }
    }
    return out;
  }
  return value;
}

export const filter = {
  init(config) {
    let settings;
    try {
      settings = JSON.parse(config || '{}');
    } catch (error) {
      throw `config is not JSON: ${error}`;
    }
    for (const key of Object.keys(settings)) {
      if (key !== 'fields' && key !== 'replacement') {
        throw `unknown field: ${key}`;
      }
    }
    if (settings.fields !== undefined) {
      if (!Array.isArray(settings.fields) || settings.fields.some((f) => typeof f !== 'string')) {
        throw 'fields must be a list of strings';
      }
      fields = new Set(settings.fields);
    }
    if (settings.replacement !== undefined) {
      replacement = settings.replacement;
    }
    return { onRequest: false, onResponse: true, onLog: false, requestBody: false, responseBody: true };
  },

  onRequest(req) {
    return { tag: 'continue' };
  },

  onResponse(req, resp) {
    const type = resp.header('content-type') || '';
    if (!type.includes('json')) {
      return;
    }
    let document;
    try {
      document = JSON.parse(new TextDecoder().decode(resp.body()));
    } catch (error) {
      write('warn', `response is not JSON, left as it is: ${error}`);
      return;
    }
    const counter = { count: 0 };
    const redacted = redact(document, counter);
    resp.setBody(new TextEncoder().encode(JSON.stringify(redacted)));
    resp.setHeader('x-redacted-fields', String(counter.count));
    // Every instance adds to the same total: the kv is the plugin's, not the instance's.
    const total = incr('redacted', BigInt(counter.count), undefined);
    resp.setHeader('x-redacted-total', String(total));
  },

  onLog(req, summary) {},
};
