from conftest import bearer, mint


async def test_events_round_trip(gateway, upstream, rsa_key):
    upstream.route("GET", "/v1/modules/scaicore/events", json_body={"data": {"events": [{"type": "x", "n": 123456789012345678901234567890}], "next_cursor": "a+b/c=="}})
    token = mint(rsa_key, permissions=["scaicore:view"])
    response = await gateway.get("/api/v1/scaicore/events", params={"cursor": "a+b/c==", "limit": "5"}, headers=bearer(token))
    body = await response.read()
    print(response.status, body, dict(response.headers))
    assert response.status == 200
    assert upstream.last.query == {"cursor": ["a+b/c=="], "limit": ["5"]}
    assert upstream.last.headers["Authorization"] == f"Bearer {token}"
