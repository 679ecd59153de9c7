// `ksa serve` end to end, driven by the official `openai` npm client and by raw HTTP (tests/serve/serve_test.sh
// runs it; ctest ksa_serve_e2e). Every server it starts listens on 127.0.0.1 on a free port.
//   node tests/serve/e2e.js <ksa binary> <model dir> <repository root>
// Checks: chat, completions and streaming through the client; streamed text == non-streamed text for the same
// seed; greedy output == `ksa generate`; stop strings; /v1/models, /tokenize, /detokenize; 120 concurrent
// streaming clients, a fifth of them disconnecting, after which /metrics shows no live sequence and zero KV
// bytes; a table of malformed and hostile requests with their statuses; 429 when the queue is full; SIGTERM
// lets a running stream finish and exits 0. Bounded: the whole run is killed after TIME_LIMIT_S.
'use strict';
const { spawn, execFile } = require('child_process');
const http = require('http');
const net = require('net');
const path = require('path');
const crypto = require('crypto');

const [KSA, MODEL_DIR, ROOT] = process.argv.slice(2);
const OpenAI = require(path.join(ROOT, '.cache/openai-node/node_modules/openai'));
const TIME_LIMIT_S = 240;
const MODEL = path.basename(MODEL_DIR);
const CTX = 1024;

let failures = 0;
const servers = [];
function check(ok, name, detail) {
  if (ok) console.log(`ok   ${name}`);
  else {
    failures++;
    console.log(`FAIL ${name}${detail !== undefined ? ': ' + detail : ''}`);
  }
  return ok;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const killer = setTimeout(() => {
  console.log(`FAIL the test ran past ${TIME_LIMIT_S} s; killing the servers`);
  for (const s of servers) s.proc.kill('SIGKILL');
  process.exit(1);
}, TIME_LIMIT_S * 1000);

// Starts `ksa serve --port 0 ...` and resolves once it listens (the port comes from its log line).
function startServer(args) {
  return new Promise((resolve, reject) => {
    const proc = spawn(KSA, ['serve', '-m', MODEL_DIR, '--host', '127.0.0.1', '--port', '0', '-t', '1', '--quiet', ...args], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    const s = { proc, log: '', port: 0 };
    s.exited = new Promise((r) => proc.on('exit', (code, signal) => r({ code, signal })));
    servers.push(s);
    const timer = setTimeout(() => reject(new Error('the server did not start in 60 s:\n' + s.log)), 60000);
    proc.stderr.on('data', (d) => {
      s.log += d.toString();
      const m = s.log.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (m && !s.port) {
        s.port = Number(m[1]);
        clearTimeout(timer);
        resolve(s);
      }
    });
    proc.on('exit', (code) => {
      if (!s.port) {
        clearTimeout(timer);
        reject(new Error(`the server exited with ${code}:\n${s.log}`));
      }
    });
  });
}

// One HTTP request without keep-alive; resolves {status, headers, body} or {error}.
function raw(port, { method = 'POST', path: p = '/v1/chat/completions', headers = {}, body = null }) {
  return new Promise((resolve) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers, agent: false }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString() }));
      res.on('error', (e) => resolve({ error: e.message }));
    });
    req.on('error', (e) => resolve({ error: e.message }));
    req.setTimeout(60000, () => req.destroy(new Error('timeout')));
    if (body !== null) req.write(body);
    req.end();
  });
}

// /metrics as {"name{labels}": value}.
async function metrics(port) {
  const r = await raw(port, { method: 'GET', path: '/metrics' });
  const out = {};
  for (const line of (r.body || '').split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out[line.slice(0, i)] = Number(line.slice(i + 1));
  }
  return out;
}

// Waits until the server holds no sequence, no KV bytes, nothing running or queued.
async function settled(port, limit_ms = 20000) {
  const end = Date.now() + limit_ms;
  let m;
  while (Date.now() < end) {
    m = await metrics(port);
    if (m.ksa_live_sequences === 0 && m.ksa_kv_bytes_in_use === 0 && m.ksa_running_sequences === 0 && m.ksa_queue_depth === 0)
      return m;
    await sleep(50);
  }
  return m;
}

// Reads a stream to its end: text, chunks, finish_reason, usage.
async function collect(stream) {
  const r = { text: '', chunks: [], finish: null, usage: null };
  for await (const c of stream) {
    r.chunks.push(c);
    if (c.usage) r.usage = c.usage;
    for (const ch of c.choices) {
      r.text += ch.delta ? ch.delta.content || '' : ch.text || '';
      if (ch.finish_reason) r.finish = ch.finish_reason;
    }
  }
  return r;
}

// `ksa generate`'s continuation of a prompt (it ends its output with a newline unless the text has one).
// Asynchronous: a synchronous child would stall the event loop for seconds (under the sanitizers), so the
// client's agent would miss the server closing an idle keep-alive connection and reuse the dead socket
// ("Connection error" with maxRetries 0).
function generate(prompt, n, extra = []) {
  return new Promise((resolve, reject) => {
    execFile(KSA, ['generate', '-m', MODEL_DIR, '-p', prompt, '-n', String(n), '-t', '1', '--no-display-prompt', '--batch-invariant', ...extra],
      { maxBuffer: 16 << 20 }, (err, stdout) => (err ? reject(err) : resolve(stdout.toString())));
  });
}
function sameAsGenerate(server, gen) {
  return gen === server || gen === server + '\n';
}

async function basics(client, port) {
  const models = await client.models.list();
  check(models.data.length === 1 && models.data[0].id === MODEL, 'GET /v1/models lists the model', JSON.stringify(models.data));
  const h = await raw(port, { method: 'GET', path: '/health' });
  check(h.status === 200 && JSON.parse(h.body).status === 'ok', 'GET /health is 200', h.body);
  const auth = { Authorization: `Bearer ${client.apiKey}` };
  const text = 'Kwai Summary Attention, 2026: héllo wörld ✓';
  const t = await raw(port, { path: '/tokenize', headers: auth, body: JSON.stringify({ prompt: text }) });
  const tj = JSON.parse(t.body);
  check(t.status === 200 && tj.count === tj.tokens.length && tj.count > 5 && tj.max_model_len === CTX, 'POST /tokenize', t.body);
  const d = await raw(port, { path: '/detokenize', headers: auth, body: JSON.stringify({ tokens: tj.tokens }) });
  check(d.status === 200 && JSON.parse(d.body).prompt === text, 'POST /detokenize inverts /tokenize', d.body);
  const tc = await raw(port, { path: '/tokenize', headers: auth, body: JSON.stringify({ messages: [{ role: 'user', content: 'hi' }] }) });
  check(tc.status === 200 && JSON.parse(tc.body).count > JSON.parse((await raw(port, { path: '/tokenize', headers: auth, body: '{"prompt":"hi"}' })).body).count,
        'POST /tokenize with messages applies the chat template', tc.body);
}

async function streamedEqualsWhole(client) {
  const messages = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Name three prime numbers.' }];
  const opts = { model: MODEL, messages, max_tokens: 24, temperature: 0.8, top_k: 40, seed: 1234 };
  const whole = await client.chat.completions.create(opts);
  const s = await collect(await client.chat.completions.create({ ...opts, stream: true, stream_options: { include_usage: true } }));
  const w = whole.choices[0];
  check(whole.object === 'chat.completion' && w.message.role === 'assistant' && typeof w.message.content === 'string',
        'chat completion is well formed', JSON.stringify(whole));
  check(s.text === w.message.content, 'chat: streamed text == non-streamed text (same seed)', JSON.stringify([s.text, w.message.content]));
  check(s.finish === w.finish_reason && ['stop', 'length'].includes(s.finish), 'chat: same finish_reason', `${s.finish} vs ${w.finish_reason}`);
  check(s.usage && s.usage.completion_tokens === whole.usage.completion_tokens && s.usage.prompt_tokens === whole.usage.prompt_tokens &&
        whole.usage.total_tokens === whole.usage.prompt_tokens + whole.usage.completion_tokens,
        'chat: same usage, streamed (include_usage) and not', JSON.stringify([s.usage, whole.usage]));
  check(s.chunks[0].choices[0].delta.role === 'assistant' && s.chunks.every((c) => c.id === s.chunks[0].id && c.object === 'chat.completion.chunk'),
        'chat chunks: the first carries the role, all share one id');
  const other = await client.chat.completions.create({ ...opts, seed: 4321 });
  check(other.choices[0].message.content !== w.message.content, 'chat: another seed, other text');

  const copts = { model: MODEL, prompt: 'The capital of France is', max_tokens: 20, temperature: 1.0, seed: 99, top_p: 0.9 };
  const cw = await client.completions.create(copts);
  const cs = await collect(await client.completions.create({ ...copts, stream: true }));
  check(cw.object === 'text_completion' && cs.text === cw.choices[0].text && cs.finish === cw.choices[0].finish_reason,
        'completions: streamed text == non-streamed text (same seed)', JSON.stringify([cs.text, cw.choices[0].text]));
  check(cw.usage.completion_tokens <= 20 && cw.usage.prompt_tokens === 5, 'completions: usage', JSON.stringify(cw.usage));
}

async function greedyEqualsGenerate(client) {
  const prompt = 'Kwai Summary Attention compresses the cache of old chunks into summary tokens, so';
  const c = await client.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0 });
  const gen = await generate(prompt, 24);
  check(sameAsGenerate(c.choices[0].text, gen), 'greedy /v1/completions == ksa generate', JSON.stringify([c.choices[0].text, gen]));
  const chat = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: prompt }], max_tokens: 24, temperature: 0 });
  const genc = await generate(prompt, 24, ['--chat']);
  check(sameAsGenerate(chat.choices[0].message.content, genc), 'greedy /v1/chat/completions == ksa generate --chat',
        JSON.stringify([chat.choices[0].message.content, genc]));
  // Prompt as token ids: the same continuation as the text.
  const tok = JSON.parse((await raw(client.port, { path: '/tokenize', headers: { Authorization: `Bearer ${client.apiKey}` }, body: JSON.stringify({ prompt }) })).body);
  const ids = await client.completions.create({ model: MODEL, prompt: tok.tokens, max_tokens: 24, temperature: 0 });
  check(ids.choices[0].text === c.choices[0].text, 'a prompt of token ids == the same prompt as text');
  // A stop string cuts the text before it; the stop string itself is not returned.
  const cps = Array.from(c.choices[0].text);
  if (cps.length >= 12) {
    const stop = cps.slice(6, 9).join('');
    const want = c.choices[0].text.slice(0, c.choices[0].text.indexOf(stop));
    const s = await client.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0, stop: [stop, 'never-appears'] });
    check(s.choices[0].text === want && s.choices[0].finish_reason === 'stop', 'stop string: text before it, finish_reason stop',
          JSON.stringify([s.choices[0].text, want, s.choices[0].finish_reason]));
    const ss = await collect(await client.completions.create({ model: MODEL, prompt, max_tokens: 24, temperature: 0, stop, stream: true }));
    check(ss.text === want && ss.finish === 'stop', 'stop string while streaming', JSON.stringify([ss.text, want]));
  } else {
    check(false, 'stop string', 'the greedy text is too short to pick a stop string from');
  }
  const len = await client.completions.create({ model: MODEL, prompt, max_tokens: 3, temperature: 0, ignore_eos: true });
  check(len.choices[0].finish_reason === 'length' && len.usage.completion_tokens === 3, 'max_tokens: finish_reason length');
}

// 120 streaming clients at once (more than --max-seqs 32: the rest queue); every fifth disconnects: half after
// two chunks, half after a random delay (some while still queued).
async function concurrency(client, port) {
  const N = 120;
  const t0 = Date.now();
  const jobs = [];
  for (let i = 0; i < N; i++) {
    const chat = i % 2 === 0;
    const aborts = i % 5 === 4;
    const max_tokens = 8 + (i % 13);
    const sampling = i % 3 === 0 ? { temperature: 0 } : { temperature: 0.9, top_k: 30, seed: i };
    jobs.push((async () => {
      const params = chat
        ? { model: MODEL, messages: [{ role: 'user', content: `Client ${i} says hello ${'and more '.repeat(i % 7)}` }] }
        : { model: MODEL, prompt: `Client ${i}: ${'once upon a time '.repeat(1 + (i % 9))}` };
      const api = chat ? client.chat.completions : client.completions;
      const stream = await api.create({ ...params, ...sampling, max_tokens, stream: true, stream_options: { include_usage: true } });
      if (aborts) {
        if (i % 10 === 4) setTimeout(() => stream.controller.abort(), Math.floor(Math.random() * 300));
        let n = 0;
        try {
          for await (const c of stream) {
            if (++n === 2 && i % 10 === 9) stream.controller.abort();
          }
        } catch (e) {
          /* aborted */
        }
        return { i, aborted: true };
      }
      const r = await collect(stream);
      return { i, chat, max_tokens, r, params: { ...params, ...sampling, max_tokens } };
    })().catch((e) => ({ i, error: String(e) })));
  }
  const results = await Promise.all(jobs);
  const secs = (Date.now() - t0) / 1000;
  const errors = results.filter((x) => x.error);
  check(errors.length === 0, `${N} concurrent streaming clients: no client error`, errors.slice(0, 3).map((e) => `#${e.i}: ${e.error}`).join('; '));
  const done = results.filter((x) => x.r);
  let bad = [];
  for (const x of done) {
    const { r } = x;
    const ok = r.chunks.length >= 2 && ['stop', 'length'].includes(r.finish) && r.usage && r.usage.completion_tokens >= 1 &&
      r.usage.completion_tokens <= x.max_tokens && (r.finish === 'stop' || r.usage.completion_tokens === x.max_tokens) &&
      r.chunks.every((c) => c.id === r.chunks[0].id && c.object === (x.chat ? 'chat.completion.chunk' : 'text_completion'));
    if (!ok) bad.push(`#${x.i}: ${JSON.stringify({ finish: r.finish, usage: r.usage, n: r.chunks.length })}`);
  }
  check(done.length === N - N / 5 && bad.length === 0, `${done.length} completed streams are well formed (${N / 5} disconnected)`, bad.slice(0, 3).join('; '));
  console.log(`     (${N} streams in ${secs.toFixed(1)} s)`);
  // A few completed streams against the same request without streaming.
  for (const x of done.filter((d) => d.i % 3 === 1).slice(0, 4)) {
    const api = x.chat ? client.chat.completions : client.completions;
    const w = await api.create(x.params);
    const text = x.chat ? w.choices[0].message.content : w.choices[0].text;
    check(text === x.r.text, `client #${x.i}: its stream under load == the same request alone, not streamed`, JSON.stringify([x.r.text, text]));
  }
  const m = await settled(port);
  check(m.ksa_live_sequences === 0 && m.ksa_kv_bytes_in_use === 0 && m.ksa_running_sequences === 0 && m.ksa_queue_depth === 0 &&
        m.ksa_kv_bytes_reserved === 0,
        'afterwards /metrics: no live sequence, KV bytes in use 0, nothing running or queued',
        JSON.stringify({ live: m.ksa_live_sequences, kv: m.ksa_kv_bytes_in_use, running: m.ksa_running_sequences, queued: m.ksa_queue_depth }));
  const cancelled = m['ksa_completions_total{reason="cancelled"}'];
  check(cancelled >= 1, `disconnected clients cancelled their sequences (${cancelled} cancelled)`);
  check(m.ksa_time_to_first_token_seconds_count >= done.length && m.ksa_inter_token_latency_seconds_count > 0,
        '/metrics has TTFT and inter-token latency histograms');
}

async function badRequests(port, key) {
  const auth = { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' };
  const chat = (extra) => JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, ...extra });
  const comp = (extra) => JSON.stringify({ model: MODEL, max_tokens: 2, ...extra });
  const C = '/v1/chat/completions', P = '/v1/completions';
  const table = [
    ['malformed JSON', C, '{"model":', 400],
    ['not JSON at all', C, 'hello there', 400],
    ['empty body', C, '', 400],
    ['a JSON array', C, '[1,2,3]', 400],
    ['JSON null', C, 'null', 400],
    ['no model', C, JSON.stringify({ messages: [{ role: 'user', content: 'hi' }] }), 400],
    ['unknown model', C, chat({ model: 'gpt-4o' }), 404],
    ['model a number', C, chat({ model: 7 }), 400],
    ['no messages', C, JSON.stringify({ model: MODEL }), 400],
    ['messages a string', C, chat({ messages: 'hi' }), 400],
    ['messages empty', C, chat({ messages: [] }), 400],
    ['unknown role', C, chat({ messages: [{ role: 'root', content: 'x' }] }), 400],
    ['content a number', C, chat({ messages: [{ role: 'user', content: 42 }] }), 400],
    ['an image part', C, chat({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'http://x' } }] }] }), 400],
    ['max_tokens a string', C, chat({ max_tokens: '10' }), 400],
    ['max_tokens 0', C, chat({ max_tokens: 0 }), 400],
    ['max_tokens negative', C, chat({ max_tokens: -1 }), 400],
    ['max_tokens 1e30', C, chat({ max_tokens: 1e30 }), 400],
    ['max_tokens 30 digits', C, chat({ max_tokens: 0 }).replace('"max_tokens":0', '"max_tokens":123456789012345678901234567890'), 400],
    ['max_tokens past the context', C, chat({ max_tokens: CTX }), 400],
    ['temperature a string', C, chat({ temperature: 'hot' }), 400],
    ['temperature 9', C, chat({ temperature: 9 }), 400],
    ['top_p 0', C, chat({ top_p: 0 }), 400],
    ['top_k -5', C, chat({ top_k: -5 }), 400],
    ['min_p 1.5', C, chat({ min_p: 1.5 }), 400],
    ['presence_penalty 5', C, chat({ presence_penalty: 5 }), 400],
    ['frequency_penalty an array', C, chat({ frequency_penalty: [] }), 400],
    ['seed 0.5', C, chat({ seed: 0.5 }), 400],
    ['stop a number', C, chat({ stop: 7 }), 400],
    ['n 3', C, chat({ n: 3 }), 400],
    ['stream a string', C, chat({ stream: 'true' }), 400],
    ['logprobs', C, chat({ logprobs: true }), 400],
    ['tools', C, chat({ tools: [{ type: 'function', function: { name: 'f', parameters: {} } }] }), 400],
    ['non-UTF-8 bytes in a string', C, Buffer.concat([Buffer.from(`{"model":"${MODEL}","messages":[{"role":"user","content":"h`), Buffer.from([0xff, 0xfe]),
                                                      Buffer.from('"}],"max_tokens":2}')]), 400],
    ['a lone surrogate escape', C, chat({}).replace('"hi"', '"\\ud800"'), 400],
    ['nested 100,000 deep', C, chat({}).replace('"hi"', '['.repeat(100000) + ']'.repeat(100000)), 400],
    ['a 2 MiB body, chunked', C, chat({ messages: [{ role: 'user', content: 'x'.repeat(2 << 20) }] }), 413],
    ['completions: no prompt', P, comp({}), 400],
    ['completions: prompt over the context', P, comp({ prompt: 'hello '.repeat(CTX + 10) }), 400],
    ['completions: empty prompt', P, comp({ prompt: '' }), 400],
    ['completions: token id past the vocabulary', P, comp({ prompt: [1, 999999] }), 400],
    ['completions: the summary token id', P, comp({ prompt: [1, 151936] }), 400],
    ['completions: a negative token id', P, comp({ prompt: [-1] }), 400],
    ['completions: two prompts', P, comp({ prompt: ['a', 'b'] }), 400],
    ['completions: echo', P, comp({ prompt: 'a', echo: true }), 400],
    ['/tokenize: neither prompt nor messages', '/tokenize', '{}', 400],
    ['/tokenize: unknown model', '/tokenize', JSON.stringify({ model: 'nope', prompt: 'a' }), 404],
    ['/detokenize: tokens a string', '/detokenize', JSON.stringify({ tokens: 'abc' }), 400],
    ['/detokenize: token past the vocabulary', '/detokenize', JSON.stringify({ tokens: [1 << 30] }), 400],
  ];
  const results = await Promise.all(table.map(([, p, body]) => raw(port, { path: p, headers: auth, body })));
  let wrong = [];
  for (let k = 0; k < table.length; k++) {
    const [name, , , want] = table[k];
    const r = results[k];
    let ok = r.status === want;
    if (ok && want !== 413) {
      // An OpenAI-style error body.
      try {
        const e = JSON.parse(r.body).error;
        ok = typeof e.message === 'string' && typeof e.type === 'string';
      } catch (_) {
        ok = false;
      }
    }
    if (!ok) wrong.push(`${name}: got ${r.status || r.error} ${String(r.body).slice(0, 120)}, want ${want}`);
  }
  // Requests a table row cannot express.
  const extra = [];
  extra.push(['no API key', (await raw(port, { path: C, body: chat({}) })).status, 401]);
  extra.push(['a wrong API key', (await raw(port, { path: C, headers: { Authorization: 'Bearer wrong' }, body: chat({}) })).status, 401]);
  extra.push(['Basic authorization', (await raw(port, { path: C, headers: { Authorization: 'Basic ' + Buffer.from('a:b').toString('base64') }, body: chat({}) })).status, 401]);
  const big = Buffer.from(chat({ messages: [{ role: 'user', content: 'y'.repeat(3 << 20) }] }));
  extra.push(['a 3 MiB body with its Content-Length', (await raw(port, { path: C, headers: { ...auth, 'Content-Length': big.length }, body: big })).status, 413]);
  const form = { ...auth, 'Content-Type': 'multipart/form-data; boundary=xx' };
  const formBody = `--xx\r\nContent-Disposition: form-data; name="a"\r\n\r\n${chat({})}\r\n--xx--\r\n`;
  extra.push(['a multipart/form-data body', (await raw(port, { path: C, headers: form, body: formBody })).status, 400]);
  extra.push(['unknown route', (await raw(port, { method: 'GET', path: '/v1/engines', headers: auth })).status, 404]);
  const allowed = (r) => `${r.status} Allow: ${r.headers && r.headers.allow}`;
  const getOnPost = await raw(port, { method: 'GET', path: C, headers: auth });
  extra.push(['GET on a POST route', allowed(getOnPost), '405 Allow: POST']);
  const postOnGet = await raw(port, { path: '/v1/models', headers: auth, body: '{}' });
  extra.push(['POST on a GET route', allowed(postOnGet), '405 Allow: GET, HEAD']);
  extra.push(['unknown model id', (await raw(port, { method: 'GET', path: '/v1/models/nope', headers: auth })).status, 404]);
  // A NUL in the id: the whole message comes back (it once ended at the NUL, "The model `").
  const nul = await raw(port, { method: 'GET', path: '/v1/models/a%00b', headers: auth });
  let nulMessage = '';
  try { nulMessage = JSON.parse(nul.body).error.message; } catch (_) { nulMessage = String(nul.body); }
  extra.push(['a model id with a NUL', `${nul.status} ${/does not exist/.test(nulMessage)}`, '404 true']);
  extra.push(['a garbage request line', await new Promise((resolve) => {
    // Written without closing our side: the answer is read before either side closes.
    const sock = net.connect(port, '127.0.0.1', () => sock.write('NOT AN HTTP REQUEST\r\n\r\n'));
    let data = '';
    const status = () => Number((data.match(/^HTTP\/1\.1 (\d+)/) || [])[1]);
    sock.setTimeout(10000, () => sock.destroy());
    sock.on('data', (d) => {
      data += d;
      if (status()) sock.destroy();
    });
    sock.on('close', () => resolve(status() || `nothing (${JSON.stringify(data)})`));
    sock.on('error', (e) => resolve(`error ${e.message} after ${JSON.stringify(data)}`));
  }), 400]);
  for (const [name, got, want] of extra) if (got !== want) wrong.push(`${name}: got ${got}, want ${want}`);
  const n = table.length + extra.length;
  check(wrong.length === 0, `${n} malformed or hostile requests get their 4xx`, '\n     ' + wrong.join('\n     '));
  const h = await raw(port, { method: 'GET', path: '/health' });
  const ok = await raw(port, { path: C, headers: auth, body: chat({ max_tokens: 3 }) });
  check(h.status === 200 && ok.status === 200, 'the server is up and answers after them', `${h.status} ${ok.status}`);
  return n;
}

// A second server with one sequence and a queue of one: the third concurrent request gets 429. Then SIGTERM
// while a stream runs: it finishes, new requests are refused, the process exits 0.
async function queueAndShutdown() {
  const s = await startServer(['--max-seqs', '1', '--max-queue', '1', '--shutdown-grace', '60']);
  check(/prefill chunk 256 \(4096 while nothing decodes\);/.test(s.log),
        'without --prefill-chunk a CPU server takes 256 prompt tokens per step, 4096 while nothing decodes',
        s.log.split('\n')[0]);
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${s.port}/v1`, apiKey: 'none', maxRetries: 0 });
  const long = { model: MODEL, prompt: 'a long one', max_tokens: 3000, temperature: 0, ignore_eos: true, stream: true };
  const first = await client.completions.create(long);
  const it = first[Symbol.asyncIterator]();
  await it.next();  // running
  const second = client.completions.create(long);  // queued
  let m;
  for (let k = 0; k < 200 && !(m && m.ksa_queue_depth === 1); k++) m = await metrics(s.port), await sleep(20);
  const third = await raw(s.port, { path: '/v1/completions', body: JSON.stringify({ model: MODEL, prompt: 'x', max_tokens: 2 }) });
  let e3 = {};
  try { e3 = JSON.parse(third.body).error; } catch (_) {}
  check(third.status === 429 && e3.type === 'rate_limit_error', 'a full queue answers 429', `${third.status} ${third.body}`);
  first.controller.abort();
  const s2 = await second;
  s2.controller.abort();
  m = await settled(s.port);
  check(m.ksa_live_sequences === 0 && m.ksa_kv_bytes_in_use === 0, 'after the disconnects: no live sequence, no KV bytes');

  // A client of a non-streamed request that leaves while its completion decodes (3000 tokens: seconds here)
  // cancels it; it does not run to its end.
  const reason = (x, r) => x[`ksa_completions_total{reason="${r}"}`];
  const before = await metrics(s.port);
  const left = http.request({ host: '127.0.0.1', port: s.port, method: 'POST', path: '/v1/completions', agent: false });
  left.on('error', () => {});
  left.end(JSON.stringify({ model: MODEL, prompt: 'left alone', max_tokens: 3000, temperature: 0, ignore_eos: true }));
  for (let k = 0; k < 400; k++) {
    m = await metrics(s.port);
    if (m.ksa_generation_tokens_total > before.ksa_generation_tokens_total) break;
    await sleep(5);
  }
  left.destroy();
  m = await settled(s.port);
  check(reason(m, 'cancelled') === reason(before, 'cancelled') + 1 && reason(m, 'length') === reason(before, 'length'),
        'a non-streamed request whose client leaves while it decodes is cancelled',
        JSON.stringify({ cancelled: [reason(before, 'cancelled'), reason(m, 'cancelled')], length: [reason(before, 'length'), reason(m, 'length')] }));

  const stream = await client.completions.create({ model: MODEL, prompt: 'before the signal', max_tokens: 40, temperature: 0, ignore_eos: true, stream: true });
  const it2 = stream[Symbol.asyncIterator]();
  const firstChunk = await it2.next();
  s.proc.kill('SIGTERM');
  await sleep(100);
  const refused = await raw(s.port, { path: '/v1/completions', body: JSON.stringify({ model: MODEL, prompt: 'x', max_tokens: 2 }) });
  check(refused.status === 503 || refused.error !== undefined, 'after SIGTERM new requests are refused', `${refused.status || refused.error}`);
  let text = firstChunk.value.choices[0].text, finish = null;
  for (let r = await it2.next(); !r.done; r = await it2.next()) {
    text += r.value.choices[0].text;
    finish = r.value.choices[0].finish_reason || finish;
  }
  check(finish === 'length', 'SIGTERM: the running stream finishes', finish);
  const exit = await Promise.race([s.exited, sleep(20000).then(() => ({ code: 'timeout' }))]);
  check(exit.code === 0, 'SIGTERM: the server exits 0', JSON.stringify(exit));
}

async function main() {
  const key = 'sk-test-' + crypto.randomBytes(8).toString('hex');
  // --batch-invariant: the concurrency section compares streams under load with the same request alone.
  const s = await startServer(['--api-key', key, '--max-seqs', '32', '--max-queue', '200', '--ctx', String(CTX), '--max-body', '1M', '--prefill-chunk', '64', '--batch-invariant']);
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${s.port}/v1`, apiKey: key, maxRetries: 0, timeout: 120000 });
  client.port = s.port;
  const t0 = Date.now();
  const phase = async (name, f) => {
    const t = Date.now();
    await f();
    console.log(`     (${name}: ${((Date.now() - t) / 1000).toFixed(1)} s)`);
  };
  await phase('basics', () => basics(client, s.port));
  await phase('streamed == whole', () => streamedEqualsWhole(client));
  await phase('greedy == ksa generate', () => greedyEqualsGenerate(client));
  await phase('concurrency', () => concurrency(client, s.port));
  await phase('bad requests', () => badRequests(s.port, key));
  await phase('queue and shutdown', () => queueAndShutdown());
  s.proc.kill('SIGINT');
  const exit = await Promise.race([s.exited, sleep(20000).then(() => ({ code: 'timeout' }))]);
  check(exit.code === 0, 'SIGINT: the server exits 0', JSON.stringify(exit));
  console.log(`     (all: ${((Date.now() - t0) / 1000).toFixed(1)} s)`);
}

main()
  .catch((e) => {
    failures++;
    console.log(`FAIL ${e.stack || e}`);
  })
  .finally(() => {
    clearTimeout(killer);
    for (const s of servers) if (s.proc.exitCode === null && s.proc.signalCode === null) s.proc.kill('SIGKILL');
    if (failures) {
      for (const s of servers) console.log(`--- server log (tail) ---\n${s.log.split('\n').slice(-15).join('\n')}`);
      console.log(`${failures} check(s) failed`);
      process.exit(1);
    }
    console.log('all passed');
  });
