'use strict';
// Driver: @alicloud/ecs20140526 (Node Tea on @alicloud/openapi-core; ACS3-HMAC-SHA256 by
// default, --v2 for signatureAlgorithm "v2" = RPC HMAC-SHA1).
//
// Pointed at keyfleet the documented way:
//   new $OpenApiUtil.Config({ endpoint: "127.0.0.1:PORT", protocol: "http" })
// plus signatureAlgorithm: "v2" with --v2. Scenarios and output: see sdkcommon.py / sdkcommon.js.
//
//   node scripts/sdk/aliyun_tea.js --endpoint 127.0.0.1:18080 [--v2] create web-1
//
// Gateway scenarios with this SDK:
// - stale-timestamp: openapi-core's Utils.getTimestamp (RPC Timestamp and ACS3 x-acs-date) is
//   replaced by one that answers 20 minutes ago.
// - replay: Utils.getNonce (SignatureNonce / x-acs-signature-nonce) is replaced by a constant.

const crypto = require('crypto');
const common = require('./sdkcommon');

const req = common.sdkRequire();
const Ecs = req('@alicloud/ecs20140526');
const { $OpenApiUtil, AlibabaCloudError } = req('@alicloud/openapi-core');
const Utils = req('@alicloud/openapi-core/dist/utils').default;
const $dara = req('@darabonba/typescript');

class Tea {
  constructor(opts) {
    this.opts = opts;
  }

  client() {
    const config = new $OpenApiUtil.Config({
      accessKeyId: this.opts.accessKeyId,
      accessKeySecret: this.opts.accessKeySecret,
      endpoint: this.opts.endpoint,
      protocol: 'http',
      readTimeout: 30000,
      connectTimeout: 10000,
    });
    if (this.opts.v2) config.signatureAlgorithm = 'v2';
    return new Ecs.default(config);
  }

  static answer(resp) {
    return [resp.statusCode, resp.body.toMap()];
  }

  async create({ name, tags = [], resourceGroup = null, region = null }) {
    const r = new Ecs.CreateKeyPairRequest({ regionId: region || this.opts.region });
    if (name !== null && name !== undefined) r.keyPairName = name;
    if (resourceGroup) r.resourceGroupId = resourceGroup;
    if (tags.length) r.tag = tags.map(([key, value]) => new Ecs.CreateKeyPairRequestTag({ key, value }));
    return Tea.answer(await this.client().createKeyPairWithOptions(r, new $dara.RuntimeOptions({})));
  }

  async importKey(name, publicKeyBody) {
    const r = new Ecs.ImportKeyPairRequest({ regionId: this.opts.region, keyPairName: name });
    if (publicKeyBody !== null) r.publicKeyBody = publicKeyBody;
    return Tea.answer(await this.client().importKeyPairWithOptions(r, new $dara.RuntimeOptions({})));
  }

  async describe(pattern) {
    const r = new Ecs.DescribeKeyPairsRequest({ regionId: this.opts.region, pageSize: 50, includePublicKey: true });
    if (pattern) r.keyPairName = pattern;
    return Tea.answer(await this.client().describeKeyPairsWithOptions(r, new $dara.RuntimeOptions({})));
  }

  deleteKeys(names) {
    return this.deleteRaw(JSON.stringify(names));
  }

  async deleteRaw(keyPairNames) {
    const r = new Ecs.DeleteKeyPairsRequest({ regionId: this.opts.region, keyPairNames });
    return Tea.answer(await this.client().deleteKeyPairsWithOptions(r, new $dara.RuntimeOptions({})));
  }

  describeException(e) {
    if (e instanceof AlibabaCloudError) {
      return { exception: e.name, code: e.code, status: e.statusCode, message: e.message, request_id: e.requestId };
    }
    return { message: String(e && e.message), code: e && e.code };
  }

  moveClockBack(minutes) {
    Utils.getTimestamp = () => common.stamp(new Date(Date.now() - minutes * 60000));
  }

  pinNonce() {
    const nonce = crypto.randomBytes(32).toString('hex');
    Utils.getNonce = () => nonce;
  }
}

const opts = common.parseArgs(process.argv.slice(2), { region: 'cn-hangzhou' });
common.main(new Tea(opts), opts).catch((e) => {
  process.stderr.write(String(e && e.stack) + '\n');
  process.exit(1);
});
