'use strict';
// Shared scenario runner of the Node SDK drivers (aliyun_tea.js, pop_core.js); the Node twin of
// sdkcommon.py — same scenarios, same output lines, same error cases (see sdkcommon.py's
// docstring). Drivers print what the SDK returned or threw; they never decide pass/fail.

const path = require('path');
const { createRequire } = require('module');

const STALE_MINUTES = 20;
const BAD_PUBLIC_KEY = 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB-not-base64 bad@example';

// The SDKs live in target/sdk/node (scripts/sdk/setup.sh), not next to the scripts.
function sdkRequire() {
  const dir = process.env.KEYFLEET_SDK_NODE_DIR ||
    path.join(__dirname, '..', '..', 'target', 'sdk', 'node');
  return createRequire(path.join(path.resolve(dir), 'package.json'));
}

function emit(obj) {
  const sorted = {};
  for (const k of Object.keys(obj).sort()) sorted[k] = obj[k];
  process.stdout.write(JSON.stringify(sorted) + '\n');
}

class Unsupported extends Error {}

// --endpoint host:port --region R --access-key-id ID --access-key-secret S [--v2] SCENARIO ARGS...
function parseArgs(argv, defaults) {
  const opts = Object.assign({
    endpoint: process.env.KEYFLEET_SDK_ENDPOINT,
    accessKeyId: process.env.ALIBABA_CLOUD_ACCESS_KEY_ID || 'testid',
    accessKeySecret: process.env.ALIBABA_CLOUD_ACCESS_KEY_SECRET || 'testsecret',
    v2: false,
  }, defaults);
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (rest.length === 0 && a === '--endpoint') opts.endpoint = argv[++i];
    else if (rest.length === 0 && a === '--region') opts.region = argv[++i];
    else if (rest.length === 0 && a === '--access-key-id') opts.accessKeyId = argv[++i];
    else if (rest.length === 0 && a === '--access-key-secret') opts.accessKeySecret = argv[++i];
    else if (rest.length === 0 && a === '--v2') opts.v2 = true;
    else rest.push(a);
  }
  if (!opts.endpoint || rest.length === 0) {
    process.stderr.write('usage: --endpoint host:port [--region R] [--access-key-id ID] ' +
      '[--access-key-secret S] [--v2] SCENARIO ARGS...\n');
    process.exit(2);
  }
  opts.scenario = rest[0];
  opts.args = rest.slice(1);
  return opts;
}

async function outcome(sdk, op, fn) {
  let line;
  try {
    const [status, body] = await fn();
    line = { op, ok: true, status, body };
  } catch (e) {
    if (e instanceof Unsupported) throw e;
    line = Object.assign({ op, ok: false, exception: e && e.name }, sdk.describeException(e));
    if (process.env.KEYFLEET_SDK_TRACE) line.trace = String(e && e.stack);
  }
  emit(line);
  return line;
}

function splitFlags(args) {
  let name = null;
  let rg = null;
  const tags = [];
  const rest = args.slice();
  while (rest.length) {
    const a = rest.shift();
    if (a === '--tag') {
      const kv = rest.shift();
      const i = kv.indexOf('=');
      tags.push([kv.slice(0, i), kv.slice(i + 1)]);
    } else if (a === '--resource-group') {
      rg = rest.shift();
    } else if (name === null) {
      name = a;
    } else {
      throw new Error('unexpected argument ' + a);
    }
  }
  return { name, tags, resourceGroup: rg };
}

async function runError(sdk, kase, name) {
  const create = (o) => outcome(sdk, 'create', () => sdk.create(o));
  switch (kase) {
    case 'bad-name': await create({ name: '1' + name }); break;
    case 'duplicate-name': await create({ name }); await create({ name }); break;
    case 'bad-resource-group': await create({ name, resourceGroup: 'rg-doesnotexist0' }); break;
    case 'duplicate-tag-key': await create({ name, tags: [['team', 'a'], ['team', 'b']] }); break;
    case 'bad-tag-key': await create({ name, tags: [['aliyun-owned', 'v']] }); break;
    case 'bad-tag-value': await create({ name, tags: [['team', 'http://example.com']] }); break;
    case 'too-many-tags': {
      const tags = [];
      for (let i = 1; i <= 21; i++) tags.push(['k' + i, 'v']);
      await create({ name, tags });
      break;
    }
    case 'quota-exceeded':
      for (let i = 1; i <= 60; i++) {
        if (!(await create({ name: `${name}-${i}` })).ok) break;
      }
      break;
    case 'missing-name': await create({ name: null }); break;
    case 'bad-region': await create({ name, region: 'mars-1' }); break;
    case 'bad-public-key': await outcome(sdk, 'import', () => sdk.importKey(name, BAD_PUBLIC_KEY)); break;
    case 'missing-public-key': await outcome(sdk, 'import', () => sdk.importKey(name, null)); break;
    case 'bad-key-pair-names': await outcome(sdk, 'delete', () => sdk.deleteRaw('not-a-json-array')); break;
    default:
      process.stderr.write(`unknown error case ${kase}\n`);
      process.exit(2);
  }
}

async function main(sdk, o) {
  const a = o.args;
  try {
    switch (o.scenario) {
      case 'create':
        await outcome(sdk, 'create', () => sdk.create(splitFlags(a)));
        break;
      case 'create-many': {
        const n = parseInt(a[1], 10);
        const all = [];
        for (let i = 1; i <= n; i++) all.push(outcome(sdk, 'create', () => sdk.create({ name: `${a[0]}-${i}` })));
        await Promise.all(all);
        break;
      }
      case 'import': {
        const body = require('fs').readFileSync(a[1], 'utf8');
        await outcome(sdk, 'import', () => sdk.importKey(a[0], body));
        break;
      }
      case 'describe': await outcome(sdk, 'describe', () => sdk.describe(a[0] || null)); break;
      case 'delete': await outcome(sdk, 'delete', () => sdk.deleteKeys(a)); break;
      case 'error': await runError(sdk, a[0], a[1]); break;
      case 'wrong-secret':
        sdk.opts.accessKeySecret += '-wrong';
        await outcome(sdk, 'create', () => sdk.create({ name: a[0] }));
        break;
      case 'unknown-key':
        sdk.opts.accessKeyId = 'unknown-' + sdk.opts.accessKeyId;
        await outcome(sdk, 'create', () => sdk.create({ name: a[0] }));
        break;
      case 'stale-timestamp':
        sdk.moveClockBack(STALE_MINUTES);
        await outcome(sdk, 'create', () => sdk.create({ name: a[0] }));
        break;
      case 'replay':
        sdk.pinNonce();
        await outcome(sdk, 'create', () => sdk.create({ name: a[0] }));
        await outcome(sdk, 'create', () => sdk.create({ name: a[0] }));
        break;
      default:
        process.stderr.write(`unknown scenario ${o.scenario}\n`);
        process.exit(2);
    }
  } catch (e) {
    if (!(e instanceof Unsupported)) throw e;
    emit({ op: o.scenario, unsupported: true, reason: e.message });
  }
}

function stamp(date) {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z');
}

module.exports = { sdkRequire, emit, parseArgs, outcome, main, Unsupported, stamp, STALE_MINUTES };
