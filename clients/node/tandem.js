'use strict';
/**
 * A tiny Node.js client for Tandem's public gRPC API (tandem.v1.Generation).
 *
 * It loads protos/tandem/v1/generation.proto at run time: no generated code.
 *
 *   const { Client } = require('./tandem');
 *   const client = new Client('localhost:50051');
 *   const out = await client.generate('Once upon a time', { max_tokens: 32, temperature: 0 });
 *   for await (const delta of client.generateStream('Hello', { max_tokens: 8 })) {
 *     process.stdout.write(delta.text);
 *   }
 *   client.close();
 *
 * An input is a prompt string, an array of chat messages ({ role, content }), or
 * { token_ids: [...] }. Sampling keys are SamplingParams' field names (max_tokens,
 * temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, logit_bias ({ id: bias }),
 * ignore_eos, logprobs, ...); undefined or null leaves a field unset. Failed calls reject with a TandemError.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'tandem/v1/generation.proto';
const DEFAULT_ADDRESS = 'localhost:50051';

let loaded = null;

/** The loaded proto: { Generation, samplingFields }, loaded once. */
function loadProto() {
  if (loaded === null) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [PROTO_DIR],
      keepCase: true, // field names as in the .proto: max_tokens, token_ids, ...
      longs: Number,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const samplingFields = new Set(
      definition['tandem.v1.SamplingParams'].type.field.map((f) => f.name),
    );
    loaded = { Generation: grpc.loadPackageDefinition(definition).tandem.v1.Generation, samplingFields };
  }
  return loaded;
}

/** A failed call: `code` (a grpc.status number), `codeName` ("INVALID_ARGUMENT") and `details`. */
class TandemError extends Error {
  constructor(code, details) {
    const codeName = grpc.status[code] || `UNKNOWN_${code}`;
    super(`${codeName}: ${details}`);
    this.name = 'TandemError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
  }

  static fromServiceError(error) {
    return error && error.code !== undefined ? new TandemError(error.code, error.details || '') : error;
  }
}

/**
 * A GenerateRequest from an input (string, messages array or { token_ids }), sampling, and
 * the request's id, priority (higher is scheduled first) and, for messages,
 * continueFinalMessage (continue the last, assistant, message instead of a new turn).
 */
function buildRequest(input, sampling = {}, requestId = '', priority = 0,
  continueFinalMessage = false) {
  const { samplingFields } = loadProto();
  const params = {};
  for (const [key, value] of Object.entries(sampling)) {
    if (!samplingFields.has(key)) throw new TypeError(`unknown sampling parameter '${key}'`);
    if (value === undefined || value === null) continue;
    params[key] = key === 'stop' && typeof value === 'string' ? [value] : value;
  }
  const request = { sampling: params, request_id: requestId, priority };
  if (typeof input === 'string') request.text = input;
  else if (Array.isArray(input)) {
    request.messages = { messages: input, continue_final_message: continueFinalMessage };
  }
  else if (input && Array.isArray(input.token_ids)) request.token_ids = { ids: input.token_ids };
  else throw new TypeError('input must be a string, an array of messages or { token_ids }');
  return request;
}

/** FINISH_REASON_STOP -> "stop", FINISH_REASON_LENGTH -> "length", unspecified -> null. */
function finishReason(value) {
  if (!value || value === 'FINISH_REASON_UNSPECIFIED') return null;
  return String(value).replace(/^FINISH_REASON_/, '').toLowerCase();
}

/** A response (or stream message) as a plain object, with finish_reason as "stop"/"length". */
function normalize(msg) {
  return {
    text: msg.text,
    token_ids: msg.token_ids,
    finish_reason: finishReason(msg.finish_reason),
    usage: msg.usage,
    timing: msg.timing,
    logprobs: msg.logprobs,
    request_id: msg.request_id,
  };
}

class Client {
  /**
   * @param {string} address host:port of the gateway
   * @param {object} [options] apiKey (sent as "authorization: Bearer <key>"), tls,
   *   rootCerts (a PEM Buffer, implies tls), timeout (seconds per call)
   */
  constructor(address = DEFAULT_ADDRESS, { apiKey, tls = false, rootCerts, timeout } = {}) {
    const { Generation } = loadProto();
    const creds = tls || rootCerts
      ? grpc.credentials.createSsl(rootCerts || null)
      : grpc.credentials.createInsecure();
    this.stub = new Generation(address, creds);
    this.timeout = timeout;
    this.metadata = new grpc.Metadata();
    if (apiKey) this.metadata.set('authorization', `Bearer ${apiKey}`);
  }

  callOptions(timeout) {
    const seconds = timeout ?? this.timeout;
    return seconds == null ? {} : { deadline: new Date(Date.now() + seconds * 1000) };
  }

  /** Resolves to the whole completion: { text, token_ids, finish_reason, usage, timing, ... }. */
  generate(input, sampling = {},
    { requestId = '', priority = 0, continueFinalMessage = false, timeout } = {}) {
    const request = buildRequest(input, sampling, requestId, priority, continueFinalMessage);
    return new Promise((resolve, reject) => {
      this.stub.Generate(request, this.metadata, this.callOptions(timeout), (error, response) => {
        if (error) reject(TandemError.fromServiceError(error));
        else resolve(normalize(response));
      });
    });
  }

  /**
   * Yields the completion's deltas as they come; the last one carries finish_reason, usage
   * and timing. Leaving the loop early cancels the generation on the server.
   */
  async *generateStream(input, sampling = {},
    { requestId = '', priority = 0, continueFinalMessage = false, timeout } = {}) {
    const request = buildRequest(input, sampling, requestId, priority, continueFinalMessage);
    const call = this.stub.GenerateStream(request, this.metadata, this.callOptions(timeout));
    let finished = false;
    try {
      for await (const msg of call) yield normalize(msg);
      finished = true;
    } catch (error) {
      finished = true;
      throw TandemError.fromServiceError(error);
    } finally {
      if (!finished) call.cancel();
    }
  }

  close() {
    this.stub.close();
  }
}

module.exports = { Client, TandemError, buildRequest, finishReason, loadProto, DEFAULT_ADDRESS };
