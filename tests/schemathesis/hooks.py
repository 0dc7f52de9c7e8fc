"""Schemathesis hooks (tests/schemathesis/run.sh passes them in SCHEMATHESIS_HOOKS): the server's rules that JSON Schema cannot
state, applied to each generated request so that the document and the server agree on it. Each
edit keeps the request as valid or invalid as it was; Schemathesis validates it again after
this hook."""

import itertools
import json
import re
from datetime import datetime

import schemathesis

KEY = re.compile(r"[ -~]{0,254}[!-~]")  # the document's Idempotency-Key pattern
used = {}  # key -> the request it was first sent with
fresh = itertools.count()


def instant(text):
    try:
        return datetime.fromisoformat(text.replace("z", "Z"))
    except (AttributeError, TypeError, ValueError):
        return None


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    body = case.body if isinstance(case.body, dict) else {}
    # 1. A password is 8 to 72 bytes (bcrypt's limit), JSON Schema counts characters: made ASCII,
    #    where both counts agree (the length in characters is unchanged).
    if isinstance(body.get("password"), str):
        body["password"] = "".join(c if c.isascii() else "x" for c in body["password"])
    # 2. A coupon's ends_at is after its starts_at, stored ones included: the two in order, and
    #    in an update both or neither (null removes a rule).
    starts, ends = instant(body.get("starts_at")), instant(body.get("ends_at"))
    if starts and ends and starts.tzinfo and ends.tzinfo:
        if starts > ends:
            body["starts_at"], body["ends_at"] = body["ends_at"], body["starts_at"]
        elif starts == ends:
            body["ends_at"] = None
    if case.method == "PUT":
        for field, other in (("starts_at", "ends_at"), ("ends_at", "starts_at")):
            if field in body and other not in body:
                body[other] = None
    # 3. A whole number is written without a fraction: 5.0 is one to JSON Schema, not to serde.
    for field, value in body.items():
        if isinstance(value, float) and value.is_integer():
            body[field] = int(value)
    # 4. A change's value is checked with the coupon it leaves: one that sets amount_off or
    #    min_order_amount brings its currency, and one that sets percent_off or amount_off clears
    #    the other (the stored coupon may have it), so that nothing stored decides.
    if case.method == "PUT":
        if any(isinstance(body.get(f), int) for f in ("amount_off", "min_order_amount")):
            if not isinstance(body.get("currency"), str):
                body["currency"] = "EUR"
        for field, other in (("percent_off", "amount_off"), ("amount_off", "percent_off")):
            if isinstance(body.get(field), int) and other not in body:
                body[other] = None
    # 5. An If-Match is compared with the stored version: any other than "*" would be a 412
    #    (precondition_failed, rightly) for almost every request, and the body never tested.
    if "If-Match" in (case.headers or {}):
        case.headers["If-Match"] = "*"
    # 6. An Idempotency-Key names one request: a well-formed key already sent with another
    #    request (a 422 idempotency_key_reused, rightly) is replaced by a fresh one.
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and KEY.fullmatch(key):
        request = json.dumps([case.method, case.path, case.path_parameters, case.body], sort_keys=True, default=str)
        if used.setdefault(key.lstrip(" \t"), request) != request:
            key = f"fuzz-{next(fresh)}"
            case.headers["Idempotency-Key"] = key
            used[key] = request
    # 7. A charset's characters are distinct case-insensitively (codes compare so): a repeat
    #    is replaced by a code character the charset lacks, keeping its length and its shape.
    charset = body.get("charset")
    if isinstance(charset, str) and re.fullmatch(r"[A-Za-z0-9_-]{2,64}", charset):
        spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-" if c not in charset.upper())
        seen, out = set(), []
        for c in charset:
            if c.upper() in seen:
                c = next(spare)
            seen.add(c.upper())
            out.append(c)
        body["charset"] = "".join(out)
    # 8. A webhook's URL must parse and resolve, and its address is checked: the document can say
    #    only "http(s)://...". A URL the document allows becomes one the server takes (run.sh
    #    sets WEBHOOK_ALLOW_PRIVATE=on; deliveries to the discard port fail and are retried).
    url = body.get("url")
    if case.path == "/admin/webhooks" and isinstance(url, str) and re.match(r"^[Hh][Tt][Tt][Pp][Ss]?://", url) \
            and len(url) <= 2048:
        body["url"] = "http://127.0.0.1:9/hook"
