"""TikTok's official Python SDK, unchanged, against the gateway: only its host differs.

`tiktok-business-api-sdk-official` (module `business_api_client`) is synchronous
urllib3, so each call runs in a worker thread while the event loop keeps
serving the gateway and the TikTok stand-in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import business_api_client as sdk
import orjson
import pytest
from business_api_client.tiktok_business.tiktok_exceptions import TiktokSDKError

from tests.support import PIXEL, TOKEN, GatewayFactory, sha256
from tests.tiktok_stub import TikTokStub

EMAIL = " Jane.Doe@Example.COM "
PHONE = "+1 (650) 555-1234"
EXTERNAL_ID = "customer-8841"
TTP = "ttp-from-the-sdk-000001"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) SdkTest/1.0"
LANDING = "https://shop.example.com/product/42"


@pytest.fixture
def sdk_api() -> Iterator[Callable[[str], Any]]:
    """`EventCallbackApi`s whose Configuration.host is a gateway; their pools are closed after."""
    clients: list[Any] = []

    def make(host: str) -> Any:
        config = sdk.Configuration()
        config.host = host
        client = sdk.ApiClient(config)
        clients.append(client)
        return sdk.EventCallbackApi(client)

    yield make
    for client in clients:
        # Close the keep-alive sockets and the SDK's thread pool now, not in a
        # finaliser, where an unclosed socket would be an unraisable warning.
        client.rest_client.pool_manager.clear()
        client.pool.close()
        client.pool.join()


def _context(ip: str = "203.0.113.7") -> Any:
    return sdk.PixelContext(
        ad=sdk.PixelContextAd(callback="E.C.P.sdk-click-1"),
        ip=ip,
        page=sdk.PixelContextPage(url=LANDING, referrer="https://www.tiktok.com/"),
        user=sdk.PixelContextUser(
            email=EMAIL, external_id=EXTERNAL_ID, phone_number=PHONE, ttp=TTP
        ),
        user_agent=USER_AGENT,
    )


def _properties(value: float = 19.99) -> Any:
    return sdk.PixelProperties(
        contents=[
            sdk.PixelContent(
                content_id="sku-42", content_type="product", price=value, quantity=1
            )
        ],
        currency="USD",
        value=value,
    )


def _assert_hashed_v2(event: dict[str, Any]) -> None:
    """The Events API 2.0 item the gateway forwards for one of the SDK's 1.0 events."""
    user = event["user"]
    assert user["email"] == sha256("jane.doe@example.com")
    assert user["phone"] == sha256("+16505551234")
    assert user["external_id"] == sha256(EXTERNAL_ID)
    assert user["ttp"] == TTP
    assert user["ttclid"] == "E.C.P.sdk-click-1"
    assert user["ip"] == "203.0.113.7"
    assert user["user_agent"] == USER_AGENT
    assert "phone_number" not in user
    assert event["page"]["url"] == LANDING
    assert isinstance(event["event_time"], int)
    assert abs(event["event_time"] - time.time()) < 120
    assert "context" not in event and "timestamp" not in event


async def test_pixel_track_through_the_sdk(
    make_gateway: GatewayFactory, tiktok: TikTokStub, sdk_api: Callable[[str], Any]
) -> None:
    gateway = await make_gateway(merge_window=0.3)
    api = sdk_api(gateway.url)
    body = sdk.PixelTrackBody(
        pixel_code=PIXEL,
        event="CompletePayment",
        event_id="sdk-track-1",
        # The SDK types `timestamp` as a string; ISO 8601 is what its docs show.
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        context=_context(),
        properties=_properties(),
    )

    answer = await asyncio.to_thread(api.pixel_track, TOKEN, body=body)

    # The SDK returns {"data", "request_id"} only when TikTok's code was 0.
    assert answer["request_id"]
    [event] = await tiktok.wait_for_events(1)
    assert event["event"] == "CompletePayment"
    assert event["event_id"] == "sdk-track-1"
    assert event["properties"]["currency"] == "USD"
    assert event["properties"]["value"] == 19.99
    assert event["properties"]["contents"][0]["content_id"] == "sku-42"
    _assert_hashed_v2(event)
    [request] = tiktok.track_requests()
    assert request.headers["Access-Token"] == TOKEN
    assert request.body["event_source"] == "web"
    assert request.body["event_source_id"] == PIXEL
    # PII left the gateway hashed only.
    sent = orjson.dumps(request.body).lower()
    assert b"jane.doe" not in sent and b"6505551234" not in sent and b"customer-8841" not in sent


async def test_pixel_batch_through_the_sdk(
    make_gateway: GatewayFactory, tiktok: TikTokStub, sdk_api: Callable[[str], Any]
) -> None:
    gateway = await make_gateway(merge_window=0.3)
    api = sdk_api(gateway.url)
    now = str(int(time.time()))  # the other form the SDK's string timestamp takes
    body = sdk.PixelBatchBody(
        pixel_code=PIXEL,
        batch=[
            sdk.PixelbatchBatch(
                type="track",
                event="ViewContent",
                event_id="sdk-batch-1",
                timestamp=now,
                context=_context(),
                properties=_properties(5.0),
            ),
            sdk.PixelbatchBatch(
                type="track",
                event="AddToCart",
                event_id="sdk-batch-2",
                timestamp=now,
                context=_context(),
                properties=_properties(7.5),
            ),
        ],
    )

    answer = await asyncio.to_thread(api.pixel_batch, TOKEN, body=body)

    assert answer["request_id"]
    events = await tiktok.wait_for_events(2)
    by_id = {e["event_id"]: e for e in events}
    assert set(by_id) == {"sdk-batch-1", "sdk-batch-2"}
    assert by_id["sdk-batch-1"]["event"] == "ViewContent"
    assert by_id["sdk-batch-2"]["event"] == "AddToCart"
    assert by_id["sdk-batch-2"]["properties"]["value"] == 7.5
    for event in events:
        assert event["event_time"] == int(now)
        _assert_hashed_v2(event)
    assert all(r.body["event_source_id"] == PIXEL for r in tiktok.track_requests())


async def test_wrong_token_raises_the_sdks_error_with_40105(
    make_gateway: GatewayFactory, tiktok: TikTokStub, sdk_api: Callable[[str], Any]
) -> None:
    gateway = await make_gateway(merge_window=0.1)
    api = sdk_api(gateway.url)
    track = sdk.PixelTrackBody(
        pixel_code=PIXEL, event="Purchase", event_id="sdk-bad-1", context=_context()
    )
    batch = sdk.PixelBatchBody(
        pixel_code=PIXEL,
        batch=[sdk.PixelbatchBatch(event="Purchase", event_id="sdk-bad-2", context=_context())],
    )

    with pytest.raises(TiktokSDKError, match=r"Error Code: 40105\b"):
        await asyncio.to_thread(api.pixel_track, "not-the-token", body=track)
    with pytest.raises(TiktokSDKError, match=r"Error Code: 40105\b"):
        await asyncio.to_thread(api.pixel_batch, "not-the-token", body=batch)

    # Nothing was stored, so nothing is pending and nothing reaches TikTok.
    pending, dead = await gateway.store.counts()
    assert (pending, dead) == (0, 0)
    assert gateway.metric("gateway_events_rejected_total", {"reason": "auth"}) == 2
    assert tiktok.track_requests() == []


async def test_the_sdks_measurement_calls_pass_through_and_campaign_calls_do_not(
    make_gateway: GatewayFactory, tiktok: TikTokStub, sdk_api: Callable[[str], Any]
) -> None:
    gateway = await make_gateway()
    client = sdk_api(gateway.url).api_client
    measurement = sdk.MeasurementApi(client)
    # Relayed; the SDK raises on any answer but TikTok's code 0.
    await asyncio.to_thread(measurement.pixel_list, "7001", TOKEN)
    await asyncio.to_thread(measurement.offline_get, TOKEN, advertiser_id="7001")
    assert [(r.path, r.query["advertiser_id"]) for r in tiktok.requests] == [
        ("/open_api/v1.3/pixel/list/", "7001"),
        ("/open_api/v1.3/offline/get/", "7001"),
    ]

    # The same client's campaign management is not an events client's business.
    campaigns = sdk.CampaignCreationApi(client)
    with pytest.raises(sdk.rest.ApiException) as refused:
        await asyncio.to_thread(campaigns.campaign_get, "7001", TOKEN)
    assert refused.value.status == 404
    assert orjson.loads(refused.value.body)["code"] == 40400
    with pytest.raises(sdk.rest.ApiException) as refused:
        await asyncio.to_thread(measurement.pixel_list, "7001", "not-the-token")
    assert refused.value.status == 401
    assert len(tiktok.requests) == 2
