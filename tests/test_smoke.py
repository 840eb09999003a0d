import aiohttp

from support import OriginConnection


async def test_get_through_proxy(origin_factory, proxy_factory):
    async def script(conn: OriginConnection) -> None:
        while await conn.read_request():
            await conn.respond(200, b"hello")

    origin = await origin_factory(script)
    proxy = await proxy_factory(origin.url)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(proxy.url + "/x") as resp:
                assert resp.status == 200
                assert await resp.read() == b"hello"
                assert "received-status=200" in resp.headers["Proxy-Status"]
    record = await proxy.last_log()
    assert record["status"] == 200 and record["reused"] is True
    assert origin.connections == 1
