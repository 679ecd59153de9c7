#!/usr/bin/env node
// Load generator for `ksa serve` (or any OpenAI-compatible server): streams completions at several
// concurrency levels and reports requests/s, output tokens/s, time to first token and inter-token latency
// (p50/p99). Node's own http module only: no packages, so it runs on a machine without network.
//
//   node bench/serve/loadgen.js --url http://127.0.0.1:8080 [--concurrency 1,8,64] [--requests N]
//        [--prompt-tokens 128] [--max-tokens 64] [--temperature 0] [--chat] [--api-key KEY] [--json]
//
// At each level C, N requests (default: max(8, 2*C)) are sent by C workers, each starting its next request
// when the previous one ends (a closed loop). Every request asks for --max-tokens tokens with ignore_eos, so
// the work per request is fixed; the prompt is a run of distinct words of about --prompt-tokens tokens.
//   requests/s      completed requests / wall time of the level
//   output tok/s    completion tokens (the server's usage) / wall time
//   TTFT            request sent -> first streamed text (includes queueing and prefill)
//   ITL             gaps between consecutive streamed text chunks of a request (one token each, except where
//                   the server held text back, e.g. an unfinished UTF-8 character)
'use strict';
const http = require('http');

function parseArgs(argv) {
  const a = { url: 'http://127.0.0.1:8080', concurrency: '1,8,64', requests: 0, promptTokens: 128, maxTokens: 64,
              temperature: 0, chat: false, apiKey: process.env.KSA_API_KEY || '', json: false, model: '' };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i], v = () => {
      if (i + 1 >= argv.length) throw new Error(`${k} needs a value`);
      return argv[++i];
    };
    if (k === '--url') a.url = v();
    else if (k === '--concurrency') a.concurrency = v();
    else if (k === '--requests') a.requests = Number(v());
    else if (k === '--prompt-tokens') a.promptTokens = Number(v());
    else if (k === '--max-tokens') a.maxTokens = Number(v());
    else if (k === '--temperature') a.temperature = Number(v());
    else if (k === '--model') a.model = v();
    else if (k === '--api-key') a.apiKey = v();
    else if (k === '--chat') a.chat = true;
    else if (k === '--json') a.json = true;
    else if (k === '-h' || k === '--help') {
      console.log(require('fs').readFileSync(__filename, 'utf8').split('\n').filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n'));
      process.exit(0);
    } else throw new Error(`unknown flag ${k}`);
  }
  a.levels = a.concurrency.split(',').map(Number);
  if (a.levels.some((c) => !(c >= 1))) throw new Error('--concurrency: positive integers, comma-separated');
  return a;
}

const args = parseArgs(process.argv.slice(2));
const base = new URL(args.url);
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

function request(method, path, body) {
  return new Promise((resolve, reject) => {
    const headers = { 'Content-Type': 'application/json' };
    if (args.apiKey) headers.Authorization = `Bearer ${args.apiKey}`;
    const req = http.request({ host: base.hostname, port: base.port, method, path, headers, agent }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    if (body) req.write(JSON.stringify(body));
    req.end();
  });
}

// One streamed request: {ttft, gaps[], tokens, ok}.
function streamOne(body, path) {
  return new Promise((resolve) => {
    const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
    if (args.apiKey) headers.Authorization = `Bearer ${args.apiKey}`;
    const t0 = process.hrtime.bigint();
    let last = 0n, ttft = -1, buf = '', tokens = 0, finish = null;
    const gaps = [];
    const req = http.request({ host: base.hostname, port: base.port, method: 'POST', path, headers, agent }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        resolve({ ok: false, error: `HTTP ${res.statusCode}` });
        return;
      }
      res.setEncoding('utf8');
      res.on('data', (d) => {
        const now = process.hrtime.bigint();
        buf += d;
        let k;
        while ((k = buf.indexOf('\n\n')) >= 0) {
          const ev = buf.slice(0, k);
          buf = buf.slice(k + 2);
          if (!ev.startsWith('data: ') || ev === 'data: [DONE]') continue;
          const j = JSON.parse(ev.slice(6));
          if (j.usage) tokens = j.usage.completion_tokens;
          for (const c of j.choices || []) {
            const text = c.delta ? c.delta.content : c.text;
            if (c.finish_reason) finish = c.finish_reason;
            if (!text) continue;
            if (ttft < 0) ttft = Number(now - t0) / 1e6;
            else gaps.push(Number(now - last) / 1e6);
            last = now;
          }
        }
      });
      res.on('end', () => resolve({ ok: finish !== null, ttft, gaps, tokens, error: finish ? '' : 'no finish_reason' }));
      res.on('error', (e) => resolve({ ok: false, error: e.message }));
    });
    req.on('error', (e) => resolve({ ok: false, error: e.message }));
    req.write(JSON.stringify(body));
    req.end();
  });
}

const words = ['river', 'stone', 'lantern', 'orbit', 'meadow', 'copper', 'signal', 'harbor', 'violet', 'engine', 'summit',
               'thread', 'canyon', 'ember', 'quartz', 'willow', 'beacon', 'glacier', 'saddle', 'prism'];
function prompt(i, n) {
  const out = [`Request ${i}:`];
  for (let k = 0; k < n - 2; k++) out.push(words[(k * 7 + i * 3) % words.length]);
  return out.join(' ');
}

function pct(xs, p) {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

async function level(C, model) {
  const N = args.requests > 0 ? args.requests : Math.max(8, 2 * C);
  const path = args.chat ? '/v1/chat/completions' : '/v1/completions';
  let next = 0;
  const results = [];
  const t0 = process.hrtime.bigint();
  const worker = async () => {
    while (next < N) {
      const i = next++;
      const text = prompt(i, args.promptTokens);
      const body = { model, max_tokens: args.maxTokens, temperature: args.temperature, ignore_eos: true, seed: i, stream: true,
                     stream_options: { include_usage: true } };
      if (args.chat) body.messages = [{ role: 'user', content: text }];
      else body.prompt = text;
      results.push(await streamOne(body, path));
    }
  };
  await Promise.all(Array.from({ length: C }, worker));
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const ok = results.filter((r) => r.ok);
  const tokens = ok.reduce((s, r) => s + r.tokens, 0);
  const ttft = ok.map((r) => r.ttft);
  const itl = ok.flatMap((r) => r.gaps);
  return { concurrency: C, requests: N, ok: ok.length, errors: results.filter((r) => !r.ok).map((r) => r.error).slice(0, 3), seconds: secs,
           req_per_s: ok.length / secs, out_tok_per_s: tokens / secs, ttft_p50_ms: pct(ttft, 50), ttft_p99_ms: pct(ttft, 99),
           itl_p50_ms: pct(itl, 50), itl_p99_ms: pct(itl, 99) };
}

async function main() {
  let model = args.model;
  if (!model) {
    const r = await request('GET', '/v1/models');
    if (r.status !== 200) throw new Error(`GET /v1/models: HTTP ${r.status} ${r.body}`);
    model = JSON.parse(r.body).data[0].id;
  }
  // Warm-up: one short request.
  await streamOne({ model, prompt: prompt(0, 16), max_tokens: 4, temperature: 0, ignore_eos: true, stream: true }, '/v1/completions');
  const rows = [];
  if (!args.json) {
    console.log(`# ${args.url} model ${model}: prompt ~${args.promptTokens} tokens, ${args.maxTokens} output tokens per request ` +
                `(ignore_eos), temperature ${args.temperature}, ${args.chat ? 'chat' : 'completions'}, streaming`);
    console.log('| concurrent streams | requests | s | requests/s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |');
    console.log('|---|---|---|---|---|---|---|');
  }
  for (const C of args.levels) {
    const r = await level(C, model);
    rows.push(r);
    if (!args.json) {
      const f = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '-');
      console.log(`| ${C} | ${r.ok}/${r.requests} | ${f(r.seconds)} | ${f(r.req_per_s, 2)} | ${f(r.out_tok_per_s)} | ` +
                  `${f(r.ttft_p50_ms)} / ${f(r.ttft_p99_ms)} | ${f(r.itl_p50_ms)} / ${f(r.itl_p99_ms)} |`);
      if (r.errors.length) console.log(`#   errors: ${r.errors.join('; ')}`);
    }
  }
  if (args.json) console.log(JSON.stringify({ url: args.url, model, prompt_tokens: args.promptTokens, max_tokens: args.maxTokens, levels: rows }, null, 1));
  agent.destroy();
}

main().catch((e) => {
  console.error(`loadgen: ${e.message}`);
  process.exit(1);
});
