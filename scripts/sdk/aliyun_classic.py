#!/usr/bin/env python3
"""Driver: aliyun-python-sdk-ecs on aliyun-python-sdk-core ("classic", RPC v1 HMAC-SHA1 signatures).

Pointed at keyfleet the documented way: `request.set_endpoint("127.0.0.1:PORT")` (http is the
classic SDK's default protocol). Scenarios and output: see sdkcommon.py.

  target/sdk/venv/bin/python scripts/sdk/aliyun_classic.py --endpoint 127.0.0.1:18080 create web-1

How the gateway scenarios are done with this SDK:
- stale-timestamp: aliyunsdkcore.utils.parameter_helper.get_iso_8061_date (the Timestamp the
  RPC composer signs) is replaced by one that answers 20 minutes ago.
- replay: parameter_helper.get_uuid (the SignatureNonce) is replaced by a constant.
- wrong-secret: the classic SDK compares the server's "server string to sign is:" with its own
  and then reports InvalidAccessKeySecret instead of SignatureDoesNotMatch.
"""

import json
import sys
import time
import uuid

import sdkcommon
from aliyunsdkcore.acs_exception.exceptions import ClientException, ServerException
from aliyunsdkcore.client import AcsClient
from aliyunsdkcore.utils import parameter_helper
from aliyunsdkecs.request.v20140526.CreateKeyPairRequest import CreateKeyPairRequest
from aliyunsdkecs.request.v20140526.DeleteKeyPairsRequest import DeleteKeyPairsRequest
from aliyunsdkecs.request.v20140526.DescribeKeyPairsRequest import DescribeKeyPairsRequest
from aliyunsdkecs.request.v20140526.ImportKeyPairRequest import ImportKeyPairRequest


class Classic:
    def __init__(self, args):
        self.endpoint = args.endpoint
        self.region = args.region
        self.ak = args.access_key_id
        self.secret = args.access_key_secret

    def _do(self, req, region=None):
        req.set_endpoint(self.endpoint)
        client = AcsClient(self.ak, self.secret, region or self.region, timeout=30, connect_timeout=10)
        body = client.do_action_with_exception(req)
        # do_action_with_exception returns the body of a 2xx answer and raises on anything else
        return None, json.loads(body)

    def create(self, name, tags=(), resource_group=None, region=None):
        req = CreateKeyPairRequest()
        if name is not None:
            req.set_KeyPairName(name)
        if resource_group:
            req.set_ResourceGroupId(resource_group)
        if tags:
            req.set_Tags([{"Key": k, "Value": v} for k, v in tags])
        return self._do(req, region)

    def import_(self, name, public_key_body):
        req = ImportKeyPairRequest()
        req.set_KeyPairName(name)
        if public_key_body is not None:
            req.set_PublicKeyBody(public_key_body)
        return self._do(req)

    def describe(self, pattern):
        req = DescribeKeyPairsRequest()
        if pattern:
            req.set_KeyPairName(pattern)
        req.set_PageSize(50)
        req.set_IncludePublicKey(True)
        return self._do(req)

    def delete(self, names):
        return self.delete_raw(json.dumps(names))

    def delete_raw(self, key_pair_names):
        req = DeleteKeyPairsRequest()
        req.set_KeyPairNames(key_pair_names)
        return self._do(req)

    def describe_exception(self, e):
        if isinstance(e, ServerException):
            return {
                "exception": "ServerException",
                "code": e.get_error_code(),
                "status": e.get_http_status(),
                "message": e.get_error_msg(),
                "request_id": e.get_request_id(),
            }
        if isinstance(e, ClientException):
            return {"exception": "ClientException", "code": e.get_error_code(), "message": e.get_error_msg()}
        return {"message": str(e)}

    def use_wrong_secret(self):
        self.secret = self.secret + "-wrong"

    def use_unknown_key(self):
        self.ak = "unknown-" + self.ak

    def move_clock_back(self, minutes):
        def stale():
            t = time.time() - minutes * 60
            return time.strftime(parameter_helper.FORMAT_ISO_8601, time.gmtime(t))

        parameter_helper.get_iso_8061_date = stale

    def pin_nonce(self):
        nonce = str(uuid.uuid4())
        parameter_helper.get_uuid = lambda: nonce


if __name__ == "__main__":
    p = sdkcommon.parser(
        __doc__.splitlines()[0],
        {
            "region": "cn-hangzhou",
            "credentials": [
                ("--access-key-id", "ALIBABA_CLOUD_ACCESS_KEY_ID", "testid"),
                ("--access-key-secret", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "testsecret"),
            ],
        },
    )
    args = p.parse_args()
    if not args.endpoint:
        p.error("--endpoint host:port is required")
    sdkcommon.main(Classic(args), args)
    sys.exit(0)
