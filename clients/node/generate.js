#!/usr/bin/env node
'use strict';
/**
 * node generate.js [--address HOST:PORT] [--stream] [--json] [--chat] [--max-tokens N]
 *                  [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S]
 *                  [--stop STR]... [--stop-token-id ID]... [--min-tokens N]
 *                  [--repetition-penalty F] [--presence-penalty F] [--frequency-penalty F]
 *                  [--logit-bias ID=BIAS]... [--ignore-eos] [--priority N]
 *                  [--api-key KEY] [--timeout SECONDS] "prompt"
 *
 * Prints the completion's text (token by token with --stream) or, with --json, one JSON
 * object: { text, token_ids, finish_reason, usage, timing, request_id }, like `tandem
 * generate --json`. Exit status 1 on a gRPC error ("INVALID_ARGUMENT: ..." on stderr),
 * 2 on bad arguments. TANDEM_ADDRESS and TANDEM_API_KEY give the defaults.
 */

const { parseArgs } = require('node:util');
const { Client, TandemError, DEFAULT_ADDRESS } = require('./tandem');

const USAGE = 'usage: node generate.js [--address HOST:PORT] [--stream] [--json] [--chat] '
  + '[--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] '
  + '[--stop STR]... [--stop-token-id ID]... [--min-tokens N] [--repetition-penalty F] '
  + '[--presence-penalty F] [--frequency-penalty F] '
  + '[--logit-bias ID=BIAS]... [--ignore-eos] [--priority N] [--api-key KEY] '
  + '[--timeout SECONDS] "prompt"';

const OPTIONS = {
  address: { type: 'string', default: process.env.TANDEM_ADDRESS || DEFAULT_ADDRESS },
  'api-key': { type: 'string', default: process.env.TANDEM_API_KEY },
  timeout: { type: 'string' },
  stream: { type: 'boolean', default: false },
  json: { type: 'boolean', default: false },
  chat: { type: 'boolean', default: false },
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  'min-p': { type: 'string' },
  seed: { type: 'string' },
  stop: { type: 'string', multiple: true },
  'logit-bias': { type: 'string', multiple: true },
  'stop-token-id': { type: 'string', multiple: true },
  'min-tokens': { type: 'string' },
  'repetition-penalty': { type: 'string' },
  'presence-penalty': { type: 'string' },
  'frequency-penalty': { type: 'string' },
  'ignore-eos': { type: 'boolean' },
  priority: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

class UsageError extends Error {}

function number(values, name, parse = Number) {
  const raw = values[name];
  if (raw === undefined) return undefined;
  const value = parse(raw);
  if (Number.isNaN(value) || raw.trim() === '') throw new UsageError(`--${name}: not a number: ${raw}`);
  return value;
}

/** --logit-bias ID=BIAS (repeatable) as the map field's object: { ID: BIAS }. */
function logitBias(entries) {
  if (entries === undefined) return undefined;
  const bias = {};
  for (const entry of entries) {
    const match = /^(-?\d+)=(.+)$/.exec(entry);
    const value = match ? Number(match[2]) : Number.NaN;
    if (Number.isNaN(value)) {
      throw new UsageError(`--logit-bias: expected ID=BIAS, like 42=-100, got ${entry}`);
    }
    bias[match[1]] = value;
  }
  return bias;
}

function parse(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  } catch (error) {
    throw new UsageError(error.message);
  }
  const { values, positionals } = parsed;
  if (values.help) return { help: true };
  if (positionals.length !== 1) throw new UsageError('expected exactly one prompt');
  const sampling = {
    max_tokens: number(values, 'max-tokens', (s) => Number.parseInt(s, 10)),
    temperature: number(values, 'temperature'),
    top_p: number(values, 'top-p'),
    top_k: number(values, 'top-k', (s) => Number.parseInt(s, 10)),
    min_p: number(values, 'min-p'),
    seed: values.seed, // uint64: passed on as a string, exactly
    stop: values.stop,
    logit_bias: logitBias(values['logit-bias']),
    stop_token_ids: values['stop-token-id']?.map((raw) => {
      const id = Number.parseInt(raw, 10);
      if (Number.isNaN(id)) throw new UsageError(`--stop-token-id: not a number: ${raw}`);
      return id;
    }),
    min_tokens: number(values, 'min-tokens', (s) => Number.parseInt(s, 10)),
    repetition_penalty: number(values, 'repetition-penalty'),
    presence_penalty: number(values, 'presence-penalty'),
    frequency_penalty: number(values, 'frequency-penalty'),
    ignore_eos: values['ignore-eos'],
  };
  const prompt = positionals[0];
  const input = values.chat ? [{ role: 'user', content: prompt }] : prompt;
  const priority = number(values, 'priority', (s) => Number.parseInt(s, 10)) ?? 0;
  return { values, sampling, input, priority, timeout: number(values, 'timeout') };
}

/** The --json object, the same shape as `tandem generate --json` prints. */
function toJson(result) {
  return {
    text: result.text,
    token_ids: result.token_ids,
    finish_reason: result.finish_reason,
    usage: {
      prompt_tokens: result.usage ? result.usage.prompt_tokens : 0,
      completion_tokens: result.usage ? result.usage.completion_tokens : 0,
      cached_prompt_tokens: result.usage ? result.usage.cached_prompt_tokens || 0 : 0,
    },
    timing: result.timing,
    request_id: result.request_id,
  };
}

async function stream(client, { input, sampling, priority, timeout, values }) {
  const whole = { text: '', token_ids: [], finish_reason: null, usage: null, timing: null };
  try {
    for await (const delta of client.generateStream(input, sampling, { priority, timeout })) {
      if (!values.json) process.stdout.write(delta.text);
      whole.text += delta.text;
      whole.token_ids.push(...delta.token_ids);
      whole.request_id = delta.request_id;
      if (delta.finish_reason) Object.assign(whole, {
        finish_reason: delta.finish_reason, usage: delta.usage, timing: delta.timing,
      });
    }
  } finally {
    if (!values.json && whole.text && !whole.text.endsWith('\n')) process.stdout.write('\n');
  }
  return whole;
}

async function main(argv) {
  let args;
  try {
    args = parse(argv);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`${USAGE}\ngenerate.js: error: ${error.message}\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const client = new Client(args.values.address, { apiKey: args.values['api-key'] });
  try {
    const result = args.values.stream
      ? await stream(client, args)
      : await client.generate(args.input, args.sampling,
        { priority: args.priority, timeout: args.timeout });
    if (args.values.json) process.stdout.write(`${JSON.stringify(toJson(result))}\n`);
    else if (!args.values.stream) {
      process.stdout.write(result.text.endsWith('\n') ? result.text : `${result.text}\n`);
    }
    return 0;
  } catch (error) {
    if (!(error instanceof TandemError)) throw error;
    process.stderr.write(`${error.message}\n`);
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
