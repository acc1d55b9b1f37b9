"""HTTP management API: health, metrics, connections/links listing, address CRUD."""

import re
import time

from proton import Delivery, Message

from helpers import (available, close_quietly, connect, http, http_json, pump, run_for, send_async, settle,
                     take, wait_outcomes)


def test_healthz_and_readyz(router):
    status, body = http("GET", router.http_url + "/healthz")
    assert status == 200 and body.strip() == "ok", (status, body)
    status, body = http("GET", router.http_url + "/readyz")
    assert status == 200 and body.strip() == "ready", (status, body)


def test_unknown_path_is_404(router):
    status, _ = http("GET", router.http_url + "/no/such/thing")
    assert status == 404


def _metric(text, name):
    """Sum of all samples of a metric family (any labels)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^%s(\{[^}]*\})?\s+([0-9.eE+-]+)" % re.escape(name), line)
        if m:
            total += float(m.group(2))
            seen = True
    return total if seen else None


def test_metrics(router):
    c = connect(router.amqp_url)
    try:
        r = c.create_receiver("metrics/addr", credit=5)
        s = c.create_sender("metrics/addr")
        d = send_async(s, Message(body="count me"))
        pump([c], lambda: available(r) >= 1, what="message")
        settle(take(r)[1])
        wait_outcomes([c], [d])
        status, text = http("GET", router.http_url + "/metrics")
        assert status == 200, status
        assert "enmesh_connections" in text, text[:2000]
        conns = _metric(text, "enmesh_connections")
        assert conns is not None and conns >= 1, "enmesh_connections=%r" % conns
        links = _metric(text, "enmesh_links")
        assert links is not None and links >= 2, "enmesh_links=%r" % links
        delivered_in = _metric(text, "enmesh_deliveries_in_total")
        assert delivered_in is not None and delivered_in >= 1, "enmesh_deliveries_in_total=%r" % delivered_in
        assert re.search(r'enmesh_deliveries_in_total\{[^}]*address="metrics/addr"', text), \
            "no per-address sample for metrics/addr:\n%s" % "\n".join(
                ln for ln in text.splitlines() if "deliveries_in" in ln)
    finally:
        close_quietly(c)


def test_connections_and_links_listing(router):
    c = connect(router.amqp_url, container_id="listing-client-42")
    try:
        r = c.create_receiver("listing/addr", credit=3, name="listing-receiver")
        status, conns = http_json("GET", router.http_url + "/api/v1/connections")
        assert status == 200
        assert isinstance(conns, list)
        mine = [x for x in conns if x.get("container_id") == "listing-client-42"]
        assert len(mine) == 1, conns
        assert {"id", "remote", "container_id", "links"} <= set(mine[0]), mine[0]
        assert mine[0]["remote"].startswith("127.0.0.1:"), mine[0]
        nlinks = mine[0]["links"]
        nlinks = nlinks if isinstance(nlinks, int) else len(nlinks)
        assert nlinks == 1, mine[0]

        run_for([c], 0.3)  # let the receiver's credit arrive
        status, links = http_json("GET", router.http_url + "/api/v1/links")
        assert status == 200
        lk = [x for x in links if x.get("name") == "listing-receiver"]
        assert len(lk) == 1, links
        assert lk[0]["role"] == "receiver", lk[0]
        assert lk[0]["address"] == "listing/addr", lk[0]
        assert lk[0]["connection"] == mine[0]["id"], (lk[0], mine[0])
        assert lk[0]["credit"] >= 3, lk[0]  # proton may top credit up
        r.close()
    finally:
        close_quietly(c)
    # gone after the client disconnects
    for _ in range(50):
        status, conns = http_json("GET", router.http_url + "/api/v1/connections")
        if not [x for x in conns if x.get("container_id") == "listing-client-42"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("closed connection still listed: %s" % conns)


def test_addresses_listing_shows_config(mc_router):
    status, addrs = http_json("GET", mc_router.http_url + "/api/v1/addresses")
    assert status == 200
    prefixes = [a for a in addrs if a.get("prefix") == "mc/"]
    assert prefixes and prefixes[0]["type"] == "multicast" and prefixes[0]["origin"] == "config", addrs
    names = [a for a in addrs if a.get("name") == "orders"]
    assert names and names[0]["type"] == "anycast", addrs
    patterns = [a for a in addrs if a.get("pattern") == "sensors/*/temp"]
    assert patterns and patterns[0]["type"] == "multicast", addrs


def _multicast_check(router, address, n_receivers=2, n_messages=5):
    prod = connect(router.amqp_url)
    consumers = [connect(router.amqp_url) for _ in range(n_receivers)]
    conns = [prod] + consumers
    try:
        rcvs = [c.create_receiver(address, credit=50) for c in consumers]
        run_for(conns, 0.3)
        snd = prod.create_sender(address)
        pump(conns, lambda: snd.credit > 0, what="producer credit")
        ds = [send_async(snd, Message(body=i)) for i in range(n_messages)]
        got = [[] for _ in rcvs]

        def drain():
            for i, r in enumerate(rcvs):
                while available(r):
                    m, d = take(r)
                    settle(d)
                    got[i].append(m.body)
            return all(len(g) >= n_messages for g in got)

        pump(conns, drain, what="every receiver gets every message (got %s)" % [len(g) for g in got])
        wait_outcomes(conns, ds)
        return got
    finally:
        close_quietly(*conns)


def test_address_create_via_api_then_multicast_then_delete(router):
    base = router.http_url + "/api/v1/addresses"
    status, body = http("POST", base, {"name": "live/feed", "type": "multicast"})
    assert status == 201, (status, body)
    status, addrs = http_json("GET", base)
    mine = [a for a in addrs if a.get("name") == "live/feed"]
    assert mine and mine[0]["type"] == "multicast" and mine[0]["origin"] == "api", addrs

    got = _multicast_check(router, "live/feed")
    assert got == [list(range(5))] * 2, got

    status, body = http("DELETE", base + "/live/feed")
    assert status == 204, (status, body)
    status, addrs = http_json("GET", base)
    assert not [a for a in addrs if a.get("name") == "live/feed"], addrs
    status, _ = http("DELETE", base + "/live/feed")
    assert status == 404


def test_address_create_prefix_via_api(router):
    base = router.http_url + "/api/v1/addresses"
    status, body = http("POST", base, {"prefix": "bcast/", "type": "multicast"})
    assert status == 201, (status, body)
    got = _multicast_check(router, "bcast/anything", n_receivers=3, n_messages=3)
    assert got == [[0, 1, 2]] * 3, got


def test_delete_unknown_address_is_404(router):
    status, _ = http("DELETE", router.http_url + "/api/v1/addresses/never-created")
    assert status == 404


def test_create_address_with_bad_body_is_rejected(router):
    status, _ = http("POST", router.http_url + "/api/v1/addresses", {"name": "x", "type": "no-such-type"})
    assert 400 <= status < 500, status
    status, _ = http("POST", router.http_url + "/api/v1/addresses", b"{not json")
    assert 400 <= status < 500, status


def test_outcome_metrics(router):
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("metrics/outcomes", credit=10)
        snd = prod.create_sender("metrics/outcomes")
        run_for([prod, cons], 0.3)
        ds = [send_async(snd, Message(body=i)) for i in range(3)]
        pump([prod, cons], lambda: available(rcv) >= 3, what="3 messages")
        for state in (Delivery.REJECTED, Delivery.RELEASED, Delivery.ACCEPTED):
            m, d = take(rcv)
            settle(d, state)
        wait_outcomes([prod, cons], ds)
        status, text = http("GET", router.http_url + "/metrics")
        assert status == 200

        def sample(name):
            m = re.search(r'^%s\{[^}]*address="metrics/outcomes"[^}]*\}\s+([0-9.eE+-]+)' % name, text, re.M)
            return float(m.group(1)) if m else None

        assert sample("enmesh_deliveries_in_total") == 3, text
        assert sample("enmesh_deliveries_out_total") == 3, text
        assert sample("enmesh_rejected_total") == 1, text
        assert sample("enmesh_released_total") == 1, text
    finally:
        close_quietly(prod, cons)
