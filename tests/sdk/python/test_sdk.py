"""Smartcar's official Python SDK (PyPI `smartcar`, the version tests/sdk/run.sh pins) driving
`carpulse simulator`, a child process on 127.0.0.1 pointed at by the SDK's own environment
variables (SMARTCAR_API_ORIGIN, SMARTCAR_AUTH_ORIGIN, SMARTCAR_CONNECT_ORIGIN,
SMARTCAR_VEHICLE_API_V3_ORIGIN, SMARTCAR_MANAGEMENT_API_ORIGIN).

Every read call the SDK offers, its OAuth calls and its error types are checked against the facts
of Smartcar's docs (smartcar-api.md). Where the SDK and the docs disagree the docs win, and the
test says why. A failure names the SDK call and what the simulator answered.

Run it through tests/sdk/run.sh (which installs the SDK into target/sdk/venv), or by hand:
    CARPULSE_BIN=target/debug/carpulse target/sdk/venv/bin/python -m unittest -v tests/sdk/python/test_sdk.py
"""

import datetime
import importlib
import json
import os
import queue
import re
import subprocess
import tempfile
import threading
import time
import unittest
import uuid
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qs, urlencode, urlsplit

import requests

REPO = Path(__file__).resolve().parents[3]
BIN = os.environ.get("CARPULSE_BIN") or str(REPO / "target" / "debug" / "carpulse")
CLIENT_ID = "sdk-conformance"
CLIENT_SECRET = "sdk-conformance-secret"
# The Application Management Token the connection tests' simulators take (--management-token).
AMT = "sdk-conformance-amt"
REDIRECT = "http://localhost:8000/callback"
# Every read permission the simulator serves.
SCOPE = [
    "read_vehicle_info",
    "read_vin",
    "read_battery",
    "read_charge",
    "read_odometer",
    "read_location",
    "read_tires",
    "read_fuel",
    "read_engine_oil",
]
START_TIMEOUT_S = 30
KM_PER_MILE = 1.609344
KPA_PER_PSI = 6.894757

smartcar = None  # imported in setUpModule, once the SDK's environment points at the simulator
# The v3 get_vehicle lives in smartcar.smartcar; 6.19.1 does not export it from the package.
get_vehicle = None


class Simulator:
    """`carpulse simulator --listen 127.0.0.1:0` as a child process; its address is read from the
    line it prints once bound ("carpulse simulator listening on http://…"), with a deadline."""

    def __init__(self, *flags):
        self.log = tempfile.NamedTemporaryFile(
            prefix="carpulse-sdk-sim-", suffix=".log", delete=False
        )
        argv = [BIN, "simulator", "--listen", "127.0.0.1:0", "--client-id", CLIENT_ID,
                "--client-secret", CLIENT_SECRET, *flags]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        lines = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        self.pump = threading.Thread(target=pump, daemon=True)
        self.pump.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        self.base = None
        while self.base is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop(keep_log=True)
                raise RuntimeError(
                    f"{' '.join(argv)} printed no address within {START_TIMEOUT_S} s; "
                    f"log: {self.log.name}"
                )
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                log = Path(self.log.name).read_text()[-2000:]
                self.stop()
                raise RuntimeError(
                    f"{' '.join(argv)} exited ({code}) before printing its address: {log}"
                )
            m = re.match(r"carpulse simulator listening on (http://\S+)", line)
            if m:
                self.base = m.group(1)

    def stop(self, keep_log=False):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pump.join(timeout=10)
        self.proc.stdout.close()
        self.log.close()
        if not keep_log:
            Path(self.log.name).unlink(missing_ok=True)

    # Introspection and faults (not Smartcar: the simulator's own /_simulator endpoints).
    def fleet(self):
        return requests.get(f"{self.base}/_simulator/vehicles", timeout=10).json()["users"]

    def fault(self, kind, vehicle_id=None, **extra):
        body = {"kind": kind, **extra}
        if vehicle_id:
            body["vehicle_id"] = vehicle_id
        r = requests.post(f"{self.base}/_simulator/faults", json=body, timeout=10)
        assert r.status_code == 200, f"POST /_simulator/faults {body} -> {r.status_code} {r.text}"

    def clear_faults(self):
        requests.delete(f"{self.base}/_simulator/faults", timeout=10).raise_for_status()

    def revoke(self, **body):
        r = requests.post(f"{self.base}/_simulator/revoke", json=body, timeout=10)
        assert r.status_code == 200, f"POST /_simulator/revoke {body} -> {r.status_code} {r.text}"

    def stats(self):
        return requests.get(f"{self.base}/_simulator/stats", timeout=10).json()

    def raw_get(self, path, token):
        """Ground truth without the SDK."""
        return requests.get(
            f"{self.base}{path}",
            headers={"Authorization": f"Bearer {token}", "sc-unit-system": "metric"},
            timeout=10,
        )


SIM = None
FLEET = None


def sdk_env(base):
    """The SDK's own origin variables, all at one simulator (§0 of smartcar-api.md). The Python
    SDK reads SMARTCAR_AUTH_ORIGIN as the whole token URL, not an origin."""
    return {
        "SMARTCAR_API_ORIGIN": base,
        "SMARTCAR_AUTH_ORIGIN": f"{base}/oauth/token",
        "SMARTCAR_CONNECT_ORIGIN": base,
        "SMARTCAR_VEHICLE_API_V3_ORIGIN": base,
        "SMARTCAR_MANAGEMENT_API_ORIGIN": base,
    }


def setUpModule():
    global SIM, FLEET, smartcar, get_vehicle
    # Two users with three cars each, one of every powertrain; time stands still so a value read
    # twice (v2 and v3, direct and in a batch) is the same.
    SIM = Simulator("--users", "2", "--vehicles-per-user", "3",
                    "--powertrains", "bev,phev,ice", "--time-scale", "0")
    os.environ.update(sdk_env(SIM.base))
    # smartcar.config reads the variables at import.
    smartcar = importlib.import_module("smartcar")
    get_vehicle = importlib.import_module("smartcar.smartcar").get_vehicle
    print(f"\nsmartcar (Python SDK) {smartcar.__version__} against {SIM.base}", flush=True)
    FLEET = SIM.fleet()


def tearDownModule():
    if SIM:
        SIM.stop()


def describe(e):
    """An exception as the SDK raised it: for a SmartcarException every field it parsed from the
    simulator's answer, for an SDK_ERROR the underlying cause."""
    if smartcar and isinstance(e, smartcar.SmartcarException):
        fields = {k: v for k, v in vars(e).items() if v is not None}
        cause = f" caused by {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else ""
        return f"SmartcarException {fields}{cause}"
    return f"{type(e).__name__}: {e}"


def auth_client(secret=CLIENT_SECRET):
    return smartcar.AuthClient(
        client_id=CLIENT_ID, client_secret=secret, redirect_uri=REDIRECT, mode="simulated"
    )


class SdkCase(unittest.TestCase):
    maxDiff = None

    def call(self, label, fn, *args, **kwargs):
        """Calls the SDK; a raise fails the test naming the call and the simulator's answer."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure is reported, with its call
            self.fail(f"{label} raised {describe(e)}")

    def raises(self, label, fn, *args, **kwargs):
        """Calls the SDK expecting a SmartcarException; returns it."""
        try:
            result = fn(*args, **kwargs)
        except smartcar.SmartcarException as e:
            return e
        except Exception as e:  # noqa: BLE001
            self.fail(f"{label}: expected a SmartcarException, got {describe(e)}")
        self.fail(f"{label}: expected a SmartcarException, but it answered {result!r}")

    def assert_v2_error(self, label, e, status, type_, code, resolution=None):
        got = (e.status_code, e.type, getattr(e, "code", None))
        self.assertEqual(got, (status, type_, code), f"{label}: {describe(e)}")
        self.assertIsNotNone(getattr(e, "request_id", None), f"{label}: no requestId: {describe(e)}")
        self.assertTrue(getattr(e, "doc_url", None), f"{label}: no docURL: {describe(e)}")
        self.assertEqual(e.resolution["type"], resolution, f"{label}: {describe(e)}")

    def connect(self, user=1, scope=None, auth=None, base=None):
        """Connect like a browser: the SDK's authorize URL, fetched without following the
        redirect; the simulator approves at once and redirects to REDIRECT with `code`. Returns
        the SDK's Access from exchange_code."""
        auth = auth or auth_client()
        state = uuid.uuid4().hex
        # `user` is Smartcar's analytics id; the simulator takes it as which account logs in.
        url = self.call("AuthClient.get_auth_url()", auth.get_auth_url, scope or SCOPE,
                        {"state": state, "force_prompt": True, "user": str(user)})
        self.assertTrue(url.startswith(f"{base or SIM.base}/oauth/authorize?"), url)
        r = requests.get(url, allow_redirects=False, timeout=10)
        self.assertEqual(r.status_code, 302, f"GET {url} -> {r.status_code} {r.text}")
        location = urlsplit(r.headers["Location"])
        query = parse_qs(location.query)
        self.assertEqual(f"{location.scheme}://{location.netloc}{location.path}", REDIRECT)
        self.assertEqual(query.get("state"), [state], r.headers["Location"])
        return self.call("AuthClient.exchange_code()", auth.exchange_code, query["code"][0])


def vehicles_of(user):
    return FLEET[user - 1]["vehicles"]


_POWERTRAINS = {}


def powertrain(vehicle_id, token):
    """The car's powertrain from v3 /vehicles/{id}, read without the SDK."""
    if vehicle_id not in _POWERTRAINS:
        r = SIM.raw_get(f"/v3/vehicles/{vehicle_id}", token)
        r.raise_for_status()
        _POWERTRAINS[vehicle_id] = r.json()["data"]["attributes"]["powertrainType"]
    return _POWERTRAINS[vehicle_id]


class OAuth(SdkCase):
    def test_authorize_url_has_the_documented_parameters_and_connect_answers_with_a_code(self):
        auth = auth_client()
        url = self.call("AuthClient.get_auth_url()", auth.get_auth_url, SCOPE,
                        {"state": "st-1", "force_prompt": True})
        parts = urlsplit(url)
        q = parse_qs(parts.query)
        self.assertEqual(f"{parts.scheme}://{parts.netloc}{parts.path}",
                         f"{SIM.base}/oauth/authorize")
        self.assertEqual(q["response_type"], ["code"])
        self.assertEqual(q["client_id"], [CLIENT_ID])
        self.assertEqual(q["redirect_uri"], [REDIRECT])
        self.assertEqual(q["scope"], [" ".join(SCOPE)])
        self.assertEqual(q["mode"], ["simulated"])
        self.assertEqual(q["approval_prompt"], ["force"])
        r = requests.get(url, allow_redirects=False, timeout=10)
        self.assertEqual(r.status_code, 302, f"GET {url} -> {r.status_code} {r.text}")
        back = parse_qs(urlsplit(r.headers["Location"]).query)
        self.assertEqual(back["state"], ["st-1"])
        uuid.UUID(back["code"][0])

    def test_code_exchange_gives_the_documented_pair_and_the_sdk_expiry(self):
        before = datetime.datetime.utcnow()
        access = self.connect()
        after = datetime.datetime.utcnow()
        # smartcar-api.md §1.3: token_type Bearer, expires_in 7200, opaque UUID-like tokens.
        self.assertEqual(access.token_type, "Bearer")
        self.assertEqual(access.expires_in, 7200)
        uuid.UUID(access.access_token)
        uuid.UUID(access.refresh_token)
        # The SDK computes expiry locally (§1.6): now + expires_in, refresh now + 60 days.
        lifetime = datetime.timedelta(seconds=7200)
        self.assertTrue(before + lifetime <= access.expiration <= after + lifetime, access)
        sixty_days = datetime.timedelta(days=60)
        self.assertTrue(before + sixty_days <= access.refresh_expiration <= after + sixty_days)

    def test_a_code_is_single_use_and_a_bad_client_secret_is_refused(self):
        auth = auth_client()
        url = auth.get_auth_url(SCOPE, {"state": "s"})
        code = parse_qs(urlsplit(
            requests.get(url, allow_redirects=False, timeout=10).headers["Location"]).query)["code"][0]
        e = self.raises("AuthClient(wrong secret).exchange_code()",
                        auth_client("wrong-secret").exchange_code, code)
        # §1.5: OAuth errors map `error` to type and `error_description` to the message.
        self.assertEqual((e.status_code, e.type), (401, "invalid_client"), describe(e))
        self.call("AuthClient.exchange_code()", auth.exchange_code, code)
        e = self.raises("AuthClient.exchange_code(used code)", auth.exchange_code, code)
        self.assertEqual((e.status_code, e.type), (400, "invalid_request"), describe(e))
        self.assertTrue(e.message.startswith("Invalid code"), describe(e))

    def test_refresh_rotates_the_pair_and_the_used_token_has_a_grace_window(self):
        auth = auth_client()
        first = self.connect(auth=auth)
        second = self.call("AuthClient.exchange_refresh_token()",
                           auth.exchange_refresh_token, first.refresh_token)
        # §1.4: every refresh returns a new access and refresh token.
        self.assertNotEqual(second.access_token, first.access_token)
        self.assertNotEqual(second.refresh_token, first.refresh_token)
        self.assertEqual((second.token_type, second.expires_in), ("Bearer", 7200))
        user = self.call("smartcar.get_user(refreshed token)", smartcar.get_user, second.access_token)
        self.assertEqual(user.id, FLEET[0]["id"])
        # The old access token stays valid until its own expiry.
        self.call("smartcar.get_user(old token)", smartcar.get_user, first.access_token)
        # The used refresh token is still accepted inside the grace window (1 minute, §1.4).
        again = self.call("AuthClient.exchange_refresh_token(used token, in grace)",
                          auth.exchange_refresh_token, first.refresh_token)
        self.assertNotEqual(again.refresh_token, second.refresh_token)

    def test_an_expired_token_is_401_and_a_refresh_recovers(self):
        # A second simulator with 1-second access tokens and no refresh grace. The Python SDK reads
        # its origins at import, so they are switched for this test on smartcar.config.
        sim = Simulator("--token-lifetime", "1", "--refresh-grace", "0")
        try:
            env = sdk_env(sim.base)
            with mock.patch.multiple(
                smartcar.config,
                API_ORIGIN=env["SMARTCAR_API_ORIGIN"],
                AUTH_ORIGIN=env["SMARTCAR_AUTH_ORIGIN"],
                CONNECT_ORIGIN=env["SMARTCAR_CONNECT_ORIGIN"],
                VEHICLE_API_ORIGIN=env["SMARTCAR_VEHICLE_API_V3_ORIGIN"],
            ):
                auth = auth_client()
                access = self.connect(auth=auth, base=sim.base)
                self.assertEqual(access.expires_in, 1)
                self.call("smartcar.get_user()", smartcar.get_user, access.access_token)
                # Wait until the SDK's own expiration has passed (it is computed after the
                # answer arrived, so the simulator's expiry is behind it).
                while datetime.datetime.utcnow() <= access.expiration:
                    time.sleep(0.05)
                e = self.raises("smartcar.get_user(expired token)", smartcar.get_user,
                                access.access_token)
                self.assert_v2_error("get_user(expired)", e, 401, "AUTHENTICATION", None)
                fresh = self.call("AuthClient.exchange_refresh_token()",
                                  auth.exchange_refresh_token, access.refresh_token)
                self.call("smartcar.get_user(fresh token)", smartcar.get_user, fresh.access_token)
                # Without a grace window the used refresh token is dead at once.
                e = self.raises("AuthClient.exchange_refresh_token(used token)",
                                auth.exchange_refresh_token, access.refresh_token)
                self.assertEqual((e.status_code, e.type), (400, "invalid_grant"), describe(e))
        finally:
            sim.stop()


class V2Reads(SdkCase):
    @classmethod
    def setUpClass(cls):
        cls.access = cls().connect(user=1)
        cls.token = cls.access.access_token
        cls.cars = vehicles_of(1)
        cls.by_powertrain = {powertrain(v["id"], cls.token): v for v in cls.cars}

    def vehicle(self, powertrain_type="BEV", **options):
        return smartcar.Vehicle(self.by_powertrain[powertrain_type]["id"], self.token, options)

    def assert_data_meta(self, label, meta, units="metric"):
        self.assertIsNotNone(meta, label)
        self.assertEqual(meta.unit_system, units, f"{label}: {meta}")
        uuid.UUID(meta.request_id)
        for field in (meta.data_age, meta.fetched_at):
            datetime.datetime.fromisoformat(field.replace("Z", "+00:00"))

    def test_user(self):
        user = self.call("smartcar.get_user()", smartcar.get_user, self.token)
        self.assertEqual(user.id, FLEET[0]["id"])
        uuid.UUID(user.meta.request_id)

    def test_vehicles_and_paging(self):
        got = self.call("smartcar.get_vehicles()", smartcar.get_vehicles, self.token)
        self.assertEqual(sorted(got.vehicles), sorted(v["id"] for v in self.cars))
        self.assertEqual((got.paging.count, got.paging.offset), (3, 0))
        page = self.call("smartcar.get_vehicles(limit 1, offset 1)", smartcar.get_vehicles,
                         self.token, {"limit": 1, "offset": 1})
        self.assertEqual(page.vehicles, got.vehicles[1:2])
        self.assertEqual((page.paging.count, page.paging.offset), (3, 1))

    def test_attributes(self):
        # The SDK asks GET /v2.0/vehicles/{id}/ (trailing slash), which Smartcar serves.
        for car in self.cars:
            got = self.call(f"Vehicle({car['id']}).attributes() [GET /v2.0/vehicles/{{id}}/]",
                            smartcar.Vehicle(car["id"], self.token).attributes)
            self.assertEqual((got.id, got.make, got.model, got.year),
                             (car["id"], car["make"], car["model"], car["year"]))
            uuid.UUID(got.meta.request_id)

    def test_vin(self):
        for car in self.cars:
            got = self.call("Vehicle.vin()", smartcar.Vehicle(car["id"], self.token).vin)
            self.assertEqual(got.vin, car["vin"])

    def test_battery_capacity_and_nominal_capacity(self):
        for kind in ("BEV", "PHEV"):
            v = self.vehicle(kind)
            battery = self.call(f"Vehicle({kind}).battery()", v.battery)
            # Fractions, not percent (§2.1).
            self.assertTrue(0 <= battery.percent_remaining <= 1, battery)
            self.assertGreaterEqual(battery.range, 0)
            self.assert_data_meta("battery()", battery.meta)
            capacity = self.call(f"Vehicle({kind}).battery_capacity()", v.battery_capacity)
            self.assertGreater(capacity.capacity, 0)
            nominal = self.call(f"Vehicle({kind}).nominal_capacity()", v.nominal_capacity)
            self.assertEqual(nominal.capacity, {"nominal": capacity.capacity, "source": "SMARTCAR"})
            self.assertEqual(nominal.availableCapacities[0].capacity, capacity.capacity)

    def test_charge_and_charge_limit(self):
        v = self.vehicle("BEV")
        charge = self.call("Vehicle.charge()", v.charge)
        self.assertIsInstance(charge.is_plugged_in, bool)
        self.assertIn(charge.state, {"CHARGING", "FULLY_CHARGED", "NOT_CHARGING"})
        self.assert_data_meta("charge()", charge.meta)
        limit = self.call("Vehicle.get_charge_limit()", v.get_charge_limit)
        self.assertTrue(0 < limit.limit <= 1, limit)

    def test_odometer_in_both_unit_systems(self):
        metric = self.call("Vehicle.odometer()", self.vehicle("BEV").odometer)
        self.assert_data_meta("odometer()", metric.meta)
        imperial = self.call("Vehicle(imperial).odometer()",
                             self.vehicle("BEV", unit_system="imperial").odometer)
        self.assert_data_meta("odometer(imperial)", imperial.meta, "imperial")
        self.assertAlmostEqual(imperial.distance, metric.distance / KM_PER_MILE, places=3)

    def test_location(self):
        got = self.call("Vehicle.location()", self.vehicle("ICE").location)
        self.assertTrue(-90 <= got.latitude <= 90 and -180 <= got.longitude <= 180, got)
        self.assert_data_meta("location()", got.meta)

    def test_tire_pressure_in_both_unit_systems(self):
        kpa = self.call("Vehicle.tire_pressure()", self.vehicle("BEV").tire_pressure)
        psi = self.call("Vehicle(imperial).tire_pressure()",
                        self.vehicle("BEV", unit_system="imperial").tire_pressure)
        for a, b in zip(kpa[:4], psi[:4]):
            self.assertTrue(150 <= a <= 300, kpa)
            self.assertAlmostEqual(b, a / KPA_PER_PSI, places=3)

    def test_fuel_and_engine_oil_and_what_a_powertrain_cannot_answer(self):
        for kind in ("ICE", "PHEV"):
            v = self.vehicle(kind)
            fuel = self.call(f"Vehicle({kind}).fuel()", v.fuel)
            self.assertTrue(0 <= fuel.percent_remaining <= 1, fuel)
            self.assertGreaterEqual(fuel.amount_remaining, 0)
            self.assertGreaterEqual(fuel.range, 0)
            oil = self.call(f"Vehicle({kind}).engine_oil()", v.engine_oil)
            self.assertTrue(0 <= oil.life_remaining <= 1, oil)
        # §4.2: 501 COMPATIBILITY:VEHICLE_NOT_CAPABLE, permanent for that endpoint and car.
        bev, ice = self.vehicle("BEV"), self.vehicle("ICE")
        for label, fn in [("BEV fuel()", bev.fuel), ("BEV engine_oil()", bev.engine_oil),
                          ("ICE battery()", ice.battery), ("ICE charge()", ice.charge)]:
            e = self.raises(f"Vehicle({label})", fn)
            self.assert_v2_error(label, e, 501, "COMPATIBILITY", "VEHICLE_NOT_CAPABLE")

    def test_permissions_and_paging(self):
        v = self.vehicle("BEV")
        got = self.call("Vehicle.permissions()", v.permissions)
        self.assertEqual(sorted(got.permissions), sorted(SCOPE))
        self.assertEqual((got.paging.count, got.paging.offset), (len(SCOPE), 0))
        page = self.call("Vehicle.permissions(limit 2, offset 1)", v.permissions,
                         {"limit": 2, "offset": 1})
        self.assertEqual(page.permissions, got.permissions[1:3])
        self.assertEqual((page.paging.count, page.paging.offset), (len(SCOPE), 1))

    def test_batch_answers_like_the_single_calls(self):
        v = self.vehicle("BEV")
        paths = ["/", "/vin", "/battery", "/battery/capacity", "/charge", "/charge/limit",
                 "/odometer", "/location", "/tires/pressure", "/permissions", "/fuel"]
        got = self.call("Vehicle.batch()", v.batch, paths)
        uuid.UUID(got.meta.request_id)
        for attr, single in [("attributes", v.attributes), ("vin", v.vin),
                             ("battery", v.battery), ("battery_capacity", v.battery_capacity),
                             ("charge", v.charge), ("get_charge_limit", v.get_charge_limit),
                             ("odometer", v.odometer), ("location", v.location),
                             ("tire_pressure", v.tire_pressure), ("permissions", v.permissions)]:
            item = self.call(f"Vehicle.batch().{attr}()", getattr(got, attr))
            direct = self.call(f"Vehicle.{attr}()", single)
            # Values agree (time stands still); meta differs (its own request).
            self.assertEqual(item[:-1], direct[:-1], attr)
            # The SDK copies the batch's sc-request-id into every item (§2.3).
            self.assertEqual(item.meta.request_id, got.meta.request_id, attr)
        e = self.raises("Vehicle.batch().fuel() on a BEV", got.fuel)
        self.assert_v2_error("batch fuel", e, 501, "COMPATIBILITY", "VEHICLE_NOT_CAPABLE")

    def test_an_endpoint_the_simulator_does_not_serve_is_a_clean_404(self):
        # /security (lock_status) is not simulated; the SDK must see Smartcar's 404 object.
        e = self.raises("Vehicle.lock_status()", self.vehicle("BEV").lock_status)
        self.assert_v2_error("lock_status()", e, 404, "RESOURCE_NOT_FOUND", "PATH")


class V3Reads(SdkCase):
    @classmethod
    def setUpClass(cls):
        cls.token = cls().connect(user=2).access_token
        cls.cars = vehicles_of(2)

    def test_get_vehicle(self):
        seen = set()
        for car in self.cars:
            got = self.call(f"smartcar.smartcar.get_vehicle({car['id']}) [GET /v3/vehicles/{{id}}]",
                            get_vehicle, self.token, car["id"])
            # The docs wrap the vehicle in `data` (§3.4).
            data = got["body"]["data"]
            self.assertEqual((data["id"], data["type"]), (car["id"], "vehicle"))
            attrs = data["attributes"]
            self.assertEqual((attrs["make"], attrs["model"], attrs["year"]),
                             (car["make"], car["model"], car["year"]))
            seen.add(attrs["powertrainType"])
            uuid.UUID(got["headers"]["sc-request-id"])
        self.assertEqual(seen, {"BEV", "PHEV", "ICE"})

    def test_get_signals(self):
        car = self.cars[0]
        got = self.call("Vehicle.get_signals()", smartcar.Vehicle(car["id"], self.token).get_signals)
        body = got["body"]
        self.assertEqual(body["meta"]["page"], 1)
        self.assertGreaterEqual(body["meta"]["totalCount"], len(body["data"]))
        self.assertEqual(body["included"]["vehicle"]["id"], car["id"])
        for signal in body["data"]:
            self.assertEqual(signal["type"], "signal")
            self.assertRegex(signal["id"], r"^[a-z]+-[a-z]+$")
            self.assertIn(signal["attributes"]["status"]["value"], {"SUCCESS", "ERROR"})
            self.assertIsInstance(signal["meta"]["retrievedAt"], int)

    def test_get_signal_agrees_with_v2(self):
        for car in self.cars:
            v = smartcar.Vehicle(car["id"], self.token)
            got = self.call("Vehicle.get_signal('odometer-traveleddistance')", v.get_signal,
                            "odometer-traveleddistance")
            attrs = got["body"]["attributes"]
            self.assertEqual(attrs["status"], {"value": "SUCCESS"})
            self.assertEqual(attrs["body"]["unit"], "kilometers")
            odometer = self.call("Vehicle.odometer()", v.odometer)
            self.assertEqual(attrs["body"]["value"], odometer.distance)
        bev = next(c for c in self.cars if powertrain(c["id"], self.token) == "BEV")
        v = smartcar.Vehicle(bev["id"], self.token)
        soc = self.call("Vehicle.get_signal('tractionbattery-stateofcharge')", v.get_signal,
                        "tractionbattery-stateofcharge")["body"]["attributes"]["body"]
        battery = self.call("Vehicle.battery()", v.battery)
        # v3 is percent (0-100), v2 a fraction (0-1) (§3.5).
        self.assertEqual(soc["unit"], "percent")
        self.assertAlmostEqual(soc["value"] / 100, battery.percent_remaining, places=4)


class Errors(SdkCase):
    @classmethod
    def setUpClass(cls):
        cls.token = cls().connect(user=1).access_token
        cls.car = next(v for v in vehicles_of(1) if powertrain(v["id"], cls.token) == "BEV")
        cls.v = smartcar.Vehicle(cls.car["id"], cls.token)

    def tearDown(self):
        SIM.clear_faults()

    def test_401_authentication(self):
        e = self.raises("smartcar.get_user(unknown token)", smartcar.get_user, "not-a-token")
        self.assert_v2_error("get_user", e, 401, "AUTHENTICATION", None)
        e = self.raises("Vehicle(unknown token).odometer()",
                        smartcar.Vehicle(self.car["id"], "not-a-token").odometer)
        self.assert_v2_error("odometer", e, 401, "AUTHENTICATION", None)

    def test_403_permission(self):
        narrow = self.connect(user=1, scope=["read_vehicle_info", "read_odometer"]).access_token
        v = smartcar.Vehicle(self.car["id"], narrow)
        self.call("Vehicle(narrow scope).odometer()", v.odometer)
        e = self.raises("Vehicle(narrow scope).battery()", v.battery)
        self.assert_v2_error("battery()", e, 403, "PERMISSION", None, "REAUTHENTICATE")
        got = self.call("Vehicle(narrow scope).permissions()", v.permissions)
        self.assertEqual(sorted(got.permissions), ["read_odometer", "read_vehicle_info"])
        SIM.fault("permission", self.car["id"], count=1)
        e = self.raises("Vehicle.odometer() [permission fault]", self.v.odometer)
        self.assert_v2_error("odometer()", e, 403, "PERMISSION", None, "REAUTHENTICATE")
        self.call("Vehicle.odometer() after the fault", self.v.odometer)

    def test_409_vehicle_state(self):
        for kind, code in [("asleep", "ASLEEP"), ("unreachable", "UNREACHABLE")]:
            SIM.fault(kind, self.car["id"], count=1)
            e = self.raises(f"Vehicle.battery() [{kind} fault]", self.v.battery)
            self.assert_v2_error(kind, e, 409, "VEHICLE_STATE", code)
            self.assertTrue(e.suggested_user_message, describe(e))
        self.call("Vehicle.battery() after the faults", self.v.battery)

    def test_429_rate_limit_with_retry_after(self):
        SIM.fault("rate_limit", self.car["id"], count=1, retry_after=7)
        e = self.raises("Vehicle.odometer() [rate_limit fault]", self.v.odometer)
        self.assert_v2_error("rate_limit", e, 429, "RATE_LIMIT", "VEHICLE", "RETRY_LATER")
        # §2.4: retry-after in seconds; the SDK hands over the header's text.
        self.assertEqual(e.retry_after, "7", describe(e))
        # Asking again before then is refused again, with what is left of the wait.
        e = self.raises("Vehicle.odometer() inside retry-after", self.v.odometer)
        self.assertEqual((e.status_code, e.code), (429, "VEHICLE"), describe(e))
        self.assertTrue(1 <= int(e.retry_after) <= 7, describe(e))
        SIM.clear_faults()
        self.call("Vehicle.odometer() after clearing", self.v.odometer)
        SIM.fault("app_rate_limit", self.car["id"], count=1)
        e = self.raises("Vehicle.odometer() [app_rate_limit fault]", self.v.odometer)
        self.assert_v2_error("app_rate_limit", e, 429, "RATE_LIMIT", "SMARTCAR_API", "RETRY_LATER")
        # Only RATE_LIMIT:VEHICLE carries retry-after (§4.1).
        self.assertIsNone(getattr(e, "retry_after", None), describe(e))

    def test_5xx_and_other_server_side_errors(self):
        cases = [
            ("server", 500, "SERVER", "INTERNAL", "RETRY_LATER"),
            ("upstream", 502, "UPSTREAM", "NO_RESPONSE", "RETRY_LATER"),
            ("compatibility", 501, "COMPATIBILITY", "VEHICLE_NOT_CAPABLE", None),
            ("billing", 430, "BILLING", "VEHICLE_REQUEST_LIMIT", "CONTACT_SUPPORT"),
        ]
        for kind, status, type_, code, resolution in cases:
            SIM.fault(kind, self.car["id"], count=1)
            e = self.raises(f"Vehicle.charge() [{kind} fault]", self.v.charge)
            self.assert_v2_error(kind, e, status, type_, code, resolution)

    def test_400_connected_services_account_points_at_the_reauth_flow(self):
        SIM.fault("connected_services_account", self.car["id"])
        e = self.raises("Vehicle.vin() [connected_services_account fault]", self.v.vin)
        self.assert_v2_error("account", e, 400, "CONNECTED_SERVICES_ACCOUNT",
                             "AUTHENTICATION_FAILED", "REAUTHENTICATE")
        url = e.resolution["url"]
        self.assertTrue(url.startswith(f"{SIM.base}/oauth/reauthenticate?"), describe(e))
        # The owner goes through the re-auth flow (a browser: GET, no redirect followed).
        r = requests.get(f"{url}&{urlencode({'redirect_uri': REDIRECT})}", allow_redirects=False,
                         timeout=10)
        self.assertEqual(r.status_code, 302, r.text)
        self.assertIn(f"vehicle_id={self.car['id']}", r.headers["Location"])
        self.call("Vehicle.vin() after re-authentication", self.v.vin)

    def test_batch_item_errors_are_the_sdks_exceptions(self):
        narrow = self.connect(user=1, scope=["read_vehicle_info", "read_odometer"]).access_token
        got = self.call("Vehicle(narrow scope).batch()",
                        smartcar.Vehicle(self.car["id"], narrow).batch, ["/odometer", "/battery"])
        self.call("batch().odometer()", got.odometer)
        e = self.raises("batch().battery() without read_battery", got.battery)
        self.assert_v2_error("batch battery", e, 403, "PERMISSION", None, "REAUTHENTICATE")
        # A fault fails the whole batch (a top-level error, §2.3).
        SIM.fault("server", self.car["id"], count=1)
        e = self.raises("Vehicle.batch() [server fault]", self.v.batch, ["/odometer"])
        self.assert_v2_error("batch", e, 500, "SERVER", "INTERNAL", "RETRY_LATER")

    def test_v3_errors_carry_the_documented_errors_envelope(self):
        # The docs' v3 error body is {"errors":[{"status":"409","type":…,"code":…}]} (§3.6). The
        # SDK's exception_factory only knows the v2 object and the OAuth shape, so it raises an
        # SDK_ERROR whose message is the raw body: the test checks that body against the docs.
        cases = [("asleep", 409, "VEHICLE_STATE", "ASLEEP"),
                 ("rate_limit", 429, "RATE_LIMIT", "VEHICLE"),
                 ("server", 500, "SERVER", "INTERNAL")]
        for kind, status, type_, code in cases:
            SIM.fault(kind, self.car["id"], count=1, retry_after=3)
            e = self.raises(f"Vehicle.get_signals() [{kind} fault]", self.v.get_signals)
            self.assertEqual((e.status_code, e.type), (status, "SDK_ERROR"), describe(e))
            error = json.loads(e.message)["errors"][0]
            self.assertEqual((error["status"], error["type"], error["code"]),
                             (str(status), type_, code), describe(e))
            SIM.clear_faults()
        e = self.raises("smartcar.smartcar.get_vehicle(unknown token)", get_vehicle,
                        "not-a-token", self.car["id"])
        self.assertEqual(e.status_code, 401, describe(e))
        self.assertEqual(json.loads(e.message)["errors"][0]["type"], "AUTHENTICATION")
        e = self.raises("Vehicle.get_signal('no-such-signal')", self.v.get_signal, "no-such-signal")
        self.assertEqual(e.status_code, 404, describe(e))
        self.assertEqual(json.loads(e.message)["errors"][0]["type"], "RESOURCE_NOT_FOUND")


class Connections(SdkCase):
    """The Management API (smartcar-api.md §7): get_connections and delete_connections, which
    send GET and DELETE /v2.0/management/connections/ with Basic base64("default:" + AMT) to
    SMARTCAR_MANAGEMENT_API_ORIGIN. Each test has its own simulator (two users with two cars
    each), as deleting connections changes what every other test would see."""

    def setUp(self):
        self.sim = Simulator("--users", "2", "--vehicles-per-user", "2",
                             "--management-token", AMT)
        self.addCleanup(self.sim.stop)
        # The Python SDK reads its origins at import: switched on smartcar.config.
        env = sdk_env(self.sim.base)
        patch = mock.patch.multiple(
            smartcar.config,
            API_ORIGIN=env["SMARTCAR_API_ORIGIN"],
            AUTH_ORIGIN=env["SMARTCAR_AUTH_ORIGIN"],
            CONNECT_ORIGIN=env["SMARTCAR_CONNECT_ORIGIN"],
            VEHICLE_API_ORIGIN=env["SMARTCAR_VEHICLE_API_V3_ORIGIN"],
            MANAGEMENT_API_ORIGIN=env["SMARTCAR_MANAGEMENT_API_ORIGIN"],
        )
        patch.start()
        self.addCleanup(patch.stop)
        self.fleet = self.sim.fleet()
        # User 1 connects, then user 2: the newest connections are user 2's.
        self.tokens = []
        for user in (1, 2):
            self.tokens.append(self.connect(user=user, base=self.sim.base).access_token)
            time.sleep(0.01)

    def pairs(self, *users):
        """(user id, vehicle id) of every car of these users (1-based), in fleet order."""
        return [(self.fleet[u - 1]["id"], v["id"])
                for u in users for v in self.fleet[u - 1]["vehicles"]]

    def listed(self, label, **kwargs):
        got = self.call(label, smartcar.get_connections, AMT, **kwargs)
        uuid.UUID(got.meta.request_id)
        return got

    def test_get_connections_lists_what_connect_approved_newest_first_by_cursor(self):
        got = self.listed("smartcar.get_connections()")
        # Newest first (§7): user 2's cars, then user 1's, as /_simulator/vehicles lists them.
        self.assertEqual([(c.user_id, c.vehicle_id) for c in got.connections],
                         self.pairs(2, 1))
        self.assertIsNone(got.paging.cursor, got)
        times = [datetime.datetime.fromisoformat(c.connected_at.replace("Z", "+00:00"))
                 for c in got.connections]
        self.assertEqual(times, sorted(times, reverse=True))
        # Paged by cursor, limit 3: 3 then 1, the last page without a cursor.
        first = self.listed("smartcar.get_connections(limit 3)", paging={"limit": 3})
        self.assertEqual(first.connections, got.connections[:3])
        self.assertTrue(first.paging.cursor, first)
        rest = self.listed("smartcar.get_connections(cursor)",
                           paging={"limit": 3, "cursor": first.paging.cursor})
        self.assertEqual(rest.connections, got.connections[3:])
        self.assertIsNone(rest.paging.cursor, rest)
        # Filters.
        user1 = self.fleet[0]["id"]
        of_user1 = self.listed("smartcar.get_connections(user_id)", filter={"user_id": user1})
        self.assertEqual(of_user1.connections, got.connections[2:])
        car = self.fleet[1]["vehicles"][1]["id"]
        one = self.listed("smartcar.get_connections(vehicle_id)", filter={"vehicle_id": car})
        self.assertEqual(one.connections, [got.connections[1]])
        # A revoked connection is no longer listed.
        self.sim.revoke(vehicle_id=car)
        after = self.listed("smartcar.get_connections() after a revoke")
        self.assertEqual([(c.user_id, c.vehicle_id) for c in after.connections],
                         [p for p in self.pairs(2, 1) if p[1] != car])
        # Another AMT: 401 AUTHENTICATION in the v2 error object.
        e = self.raises("smartcar.get_connections(wrong AMT)", smartcar.get_connections,
                        "not-the-amt")
        self.assert_v2_error("get_connections(wrong AMT)", e, 401, "AUTHENTICATION", None)
        self.assertEqual(self.sim.stats()["management_requests"], 7)

    def test_delete_connections_revokes_them(self):
        user1, user2 = self.fleet[0]["id"], self.fleet[1]["id"]
        car = self.fleet[0]["vehicles"][0]["id"]
        other = self.fleet[0]["vehicles"][1]["id"]
        got = self.call("smartcar.delete_connections(vehicle_id)", smartcar.delete_connections,
                        AMT, {"vehicle_id": car})
        self.assertEqual([(c.user_id, c.vehicle_id) for c in got.connections], [(user1, car)])
        uuid.UUID(got.meta.request_id)
        # Gone like a revoke: not listed, and the owner's token is refused on that car only.
        listed = self.listed("smartcar.get_connections() after the delete")
        self.assertNotIn(car, [c.vehicle_id for c in listed.connections])
        token = self.tokens[0]
        e = self.raises("Vehicle(deleted connection).odometer()",
                        smartcar.Vehicle(car, token).odometer)
        self.assert_v2_error("odometer()", e, 401, "AUTHENTICATION", None)
        self.call("Vehicle(other car).odometer()", smartcar.Vehicle(other, token).odometer)
        vehicles = self.call("smartcar.get_vehicles()", smartcar.get_vehicles, token)
        self.assertEqual(vehicles.vehicles, [other])
        # By user: all of their connections, newest first; then nothing is left to delete.
        got = self.call("smartcar.delete_connections(user_id)", smartcar.delete_connections,
                        AMT, {"user_id": user2})
        self.assertEqual([(c.user_id, c.vehicle_id) for c in got.connections], self.pairs(2))
        again = self.call("smartcar.delete_connections(user_id) again",
                          smartcar.delete_connections, AMT, {"user_id": user2})
        self.assertEqual(again.connections, [])
        left = self.listed("smartcar.get_connections() after both deletes")
        self.assertEqual([(c.user_id, c.vehicle_id) for c in left.connections],
                         [(user1, other)])
        # Both filters: the SDK refuses before sending anything (the simulator would say 400).
        before = self.sim.stats()["management_requests"]
        with self.assertRaisesRegex(Exception, "EITHER"):
            smartcar.delete_connections(AMT, {"user_id": user1, "vehicle_id": other})
        self.assertEqual(self.sim.stats()["management_requests"], before)
        e = self.raises("smartcar.delete_connections(wrong AMT)", smartcar.delete_connections,
                        "not-the-amt", {"user_id": user1})
        self.assert_v2_error("delete_connections(wrong AMT)", e, 401, "AUTHENTICATION", None)
        # A new Connect approval brings the car back.
        self.connect(user=1, base=self.sim.base)
        back = self.listed("smartcar.get_connections() after reconnecting")
        self.assertEqual([(c.user_id, c.vehicle_id) for c in back.connections],
                         self.pairs(1))


if __name__ == "__main__":
    unittest.main(verbosity=2)
