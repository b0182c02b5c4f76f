'use strict';
// Driver: @alicloud/pop-core RPCClient (RPC HMAC-SHA1), every request as a POST form: all
// parameters, Signature included, in an application/x-www-form-urlencoded body.
//
// Pointed at keyfleet the documented way:
//   new RPCClient({ endpoint: "http://127.0.0.1:PORT", apiVersion: "2014-05-26", ... })
//   client.request(action, params, { method: "POST" })
// Scenarios and output: see sdkcommon.py / sdkcommon.js.
//
//   node scripts/sdk/pop_core.js --endpoint 127.0.0.1:18080 create web-1
//
// Gateway scenarios with this SDK:
// - stale-timestamp: pop-core builds Timestamp with a module-private timestamp() from
//   `new Date()`; there is no helper to patch, so the global Date is replaced by one whose
//   "now" is 20 minutes back.
// - replay: SignatureNonce comes from kitx.makeNonce() (pop-core's own copy of kitx), which is
//   replaced by a constant.
// pop-core throws whenever the answer's JSON has a `Code` (the HTTP status is not looked at);
// the thrown Error carries code and data but no status, so "status" is the one the server
// answered, read from err.entry (only filled in verbose mode, which this driver turns on).

const crypto = require('crypto');
const common = require('./sdkcommon');

const req = common.sdkRequire();
const RPCClient = req('@alicloud/pop-core').RPCClient;
// pop-core requires its own kitx (node_modules/@alicloud/pop-core/node_modules/kitx)
const popRequire = require('module').createRequire(req.resolve('@alicloud/pop-core'));
const kitx = popRequire('kitx');

class PopCore {
  constructor(opts) {
    this.opts = opts;
  }

  async call(action, params) {
    const client = new RPCClient({
      endpoint: 'http://' + this.opts.endpoint,
      apiVersion: '2014-05-26',
      accessKeyId: this.opts.accessKeyId,
      accessKeySecret: this.opts.accessKeySecret,
    }, true);
    const [body, entry] = await client.request(action, params, { method: 'POST', timeout: 30000 });
    return [entry.response.statusCode, body];
  }

  create({ name, tags = [], resourceGroup = null, region = null }) {
    const p = { RegionId: region || this.opts.region };
    if (name !== null && name !== undefined) p.KeyPairName = name;
    if (resourceGroup) p.ResourceGroupId = resourceGroup;
    if (tags.length) p.Tag = tags.map(([Key, Value]) => ({ Key, Value }));
    return this.call('CreateKeyPair', p);
  }

  importKey(name, publicKeyBody) {
    const p = { RegionId: this.opts.region, KeyPairName: name };
    if (publicKeyBody !== null) p.PublicKeyBody = publicKeyBody;
    return this.call('ImportKeyPair', p);
  }

  describe(pattern) {
    const p = { RegionId: this.opts.region, PageSize: 50, IncludePublicKey: true };
    if (pattern) p.KeyPairName = pattern;
    return this.call('DescribeKeyPairs', p);
  }

  deleteKeys(names) {
    return this.deleteRaw(JSON.stringify(names));
  }

  deleteRaw(keyPairNames) {
    return this.call('DeleteKeyPairs', { RegionId: this.opts.region, KeyPairNames: keyPairNames });
  }

  describeException(e) {
    const status = e && e.entry && e.entry.response ? e.entry.response.statusCode : null;
    if (e && e.data) {
      return { exception: e.name, code: e.code, status, message: e.data.Message, request_id: e.data.RequestId };
    }
    return { message: String(e && e.message), code: e && e.code, status };
  }

  moveClockBack(minutes) {
    const Real = Date;
    const offset = minutes * 60000;
    class Stale extends Real {
      constructor(...args) {
        if (args.length === 0) super(Real.now() - offset);
        else super(...args);
      }
      static now() {
        return Real.now() - offset;
      }
    }
    global.Date = Stale;
  }

  pinNonce() {
    const nonce = crypto.randomBytes(16).toString('hex');
    kitx.makeNonce = () => nonce;
  }
}

const opts = common.parseArgs(process.argv.slice(2), { region: 'cn-hangzhou' });
common.main(new PopCore(opts), opts).catch((e) => {
  process.stderr.write(String(e && e.stack) + '\n');
  process.exit(1);
});
