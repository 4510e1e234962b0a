"""
C{country:} and C{tz:} ACL rules against a MaxMind database built here with
mmdb-writer: the lookups (L{streamrelay.geoip}), the rules' order among the
others, the configuration errors, and a real relay admitting and refusing
loopback clients by the country the database gives them.
"""

from __future__ import annotations

import gc
import re
import signal
import subprocess
import weakref
from ipaddress import ip_address
from pathlib import Path
from typing import Callable

import pytest
import maxminddb
import yaml
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from streamrelay.acl import AccessList, Decision
from streamrelay.config import ConfigError, load_config, parse_config
from streamrelay.dump import dump
from streamrelay.geoip import CACHE_SIZE, GeoIPError, open_database
from tests.harness import Relay, Target, connect_from, tcp_route, write_config
from tests.test_access import echoes, refused_from
from tests.test_check import CHECKS


def city(country: str, zone: str) -> dict[str, object]:
    """A record in the GeoLite2-City layout, names and all."""
    names = {"en": country, "de": country}
    return {
        "continent": {"code": "EU", "names": names},
        "country": {"iso_code": country, "names": names},
        "registered_country": {"iso_code": country, "names": names},
        "location": {"latitude": 1.5, "longitude": 2.5, "time_zone": zone},
    }


#: Loopback clients the tests can connect from, and where the database puts them.
PLACES: dict[str, object] = {
    "127.0.0.2/32": city("DE", "Europe/Berlin"),
    "127.0.0.3/32": city("US", "America/New_York"),
    # 127.0.0.4 is not in the database.
    "127.0.0.5/32": {"registered_country": {"iso_code": "FR"}},  # no country, no location
    "127.0.0.6/32": "not a map",
    "::1/128": city("JP", "Asia/Tokyo"),
    "2001:db8::/32": city("DE", "Europe/Berlin"),
}


def write_database(path: Path, places: dict[str, object] = PLACES, ip_version: int = 6) -> Path:
    writer = MMDBWriter(ip_version=ip_version, ipv4_compatible=ip_version == 6, database_type="GeoLite2-City")
    for network, record in places.items():
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(str(path))
    return path


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return write_database(tmp_path / "geo.mmdb")


def locate(path: Path, host: str) -> tuple[str, str]:
    address = ip_address(host)
    return open_database(str(path)).locate(address.version, int(address))


def acl(database: Path, **config: object) -> AccessList:
    return AccessList.from_config({**config, "maxmind": {"database": str(database)}})


def allowed(rule: str) -> Decision:
    return Decision(True, rule)


def denied(rule: str) -> Decision:
    return Decision(False, rule)


# ------------------------------------------------------------------ lookups


@pytest.mark.parametrize(
    "host, location",
    [
        ("127.0.0.2", ("DE", "Europe/Berlin")),
        ("127.0.0.3", ("US", "America/New_York")),
        ("127.0.0.4", ("", "")),
        ("127.0.0.5", ("FR", "")),  # registered_country stands in for country
        ("127.0.0.6", ("", "")),
        ("::1", ("JP", "Asia/Tokyo")),
        ("2001:db8:1::7", ("DE", "Europe/Berlin")),
        ("2001:db9::", ("", "")),
    ],
)
def test_locations(database: Path, host: str, location: tuple[str, str]) -> None:
    assert locate(database, host) == location


def test_ipv6_clients_are_nowhere_in_an_ipv4_database(tmp_path: Path) -> None:
    path = write_database(tmp_path / "v4.mmdb", {"127.0.0.2/32": city("DE", "Europe/Berlin")}, ip_version=4)
    assert locate(path, "127.0.0.2") == ("DE", "Europe/Berlin")
    assert locate(path, "::1") == ("", "")


def test_addresses_with_damaged_records_are_nowhere(tmp_path: Path) -> None:
    path = write_database(tmp_path / "geo.mmdb", {"127.0.0.2/32": city("DE", "Europe/Berlin")})
    metadata = maxminddb.open_database(str(path)).metadata()
    data = bytearray(path.read_bytes())
    start = metadata.node_count * metadata.record_size // 4 + 16  # the search tree, 16 bytes of zeros, the records
    data[start:start + 24] = b"\xff" * 24
    path.write_bytes(data)
    assert locate(path, "127.0.0.2") == ("", "")


def test_lookups_are_remembered(database: Path) -> None:
    access = acl(database, default="deny", allow=["country:DE"])
    assert access.maxmind is not None
    locate = access.maxmind.locate
    locate.cache_clear()
    assert [access.check("1.2.3.4").rule for _ in range(3)] == ["default deny"] * 3
    assert locate.cache_info()[:] == (2, 1, CACHE_SIZE, 1)  # hits, misses, bound, size


def test_one_reader_per_unchanged_file(database: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_database(str(database))
    monkeypatch.chdir(tmp_path)
    assert open_database("geo.mmdb") is first
    # Replaced (as geoipupdate does, by renaming a new file over it): opened anew.
    write_database(tmp_path / "new.mmdb", {"127.0.0.2/32": city("AT", "Europe/Vienna")}).rename(database)
    second = open_database(str(database))
    assert second != first
    assert (locate(database, "127.0.0.2"), first.locate(4, 0x7F000002)) == (("AT", "Europe/Vienna"), ("DE", "Europe/Berlin"))
    # Nothing holds a reader no configuration uses.
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("absent.mmdb", None, "cannot read {path}: No such file or directory"),
        ("dir.mmdb", "dir", "cannot read {path}: not a regular file"),
        ("text.mmdb", "not a database\n", "{path} is not a MaxMind database, or is damaged"),
        ("empty.mmdb", "", "{path} is not a MaxMind database, or is damaged"),
        ("cut.mmdb", "cut", "{path} is not a MaxMind database, or is damaged"),
    ],
)
def test_unusable_files(tmp_path: Path, name: str, content: str | None, reason: str) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "cut":  # a download cut short
        path.write_bytes(write_database(tmp_path / "whole.mmdb").read_bytes()[:200])
    elif content is not None:
        path.write_text(content)
    with pytest.raises(GeoIPError, match=f"^{re.escape(reason.format(path=path))}$"):
        open_database(str(path))


# ---------------------------------------------------------------- decisions


@pytest.mark.parametrize(
    "config, host, expected",
    [
        # An allow list by country, as GoDoxy writes it.
        ({"default": "deny", "allow_local": False, "allow": ["country:DE"]}, "127.0.0.2", allowed("allow country:DE")),
        ({"default": "deny", "allow_local": False, "allow": ["country:de"]}, "127.0.0.2", allowed("allow country:de")),
        ({"default": "deny", "allow_local": False, "allow": ["country:DE"]}, "::ffff:127.0.0.2", allowed("allow country:DE")),
        ({"default": "deny", "allow_local": False, "allow": ["country:DE"]}, "2001:db8::1", allowed("allow country:DE")),
        ({"default": "deny", "allow_local": False, "allow": ["country:DE"]}, "127.0.0.3", denied("default deny")),
        # Not in the database, or no usable record: no place rule matches.
        ({"default": "deny", "allow_local": False, "allow": ["country:DE"]}, "127.0.0.4", denied("default deny")),
        ({"allow_local": False, "deny": ["country:US", "tz:Europe/Berlin"]}, "127.0.0.6", allowed("default allow")),
        ({"deny": ["country:US"]}, "fe80::1%eth0", allowed("default allow")),
        # A deny list by time zone.
        ({"allow_local": False, "deny": ["tz:America/New_York"]}, "127.0.0.3", denied("deny tz:America/New_York")),
        ({"allow_local": False, "deny": ["tz:America/New_York"]}, "127.0.0.2", allowed("default allow")),
        ({"allow_local": False, "deny": ["tz:Asia/Tokyo"]}, "::1", denied("deny tz:Asia/Tokyo")),
        # registered_country when there is no country; a Country record has no time zone.
        ({"allow_local": False, "deny": ["country:FR"]}, "127.0.0.5", denied("deny country:FR")),
        ({"allow_local": False, "deny": ["tz:Europe/Paris"]}, "127.0.0.5", allowed("default allow")),
        # Deny beats allow, whatever the kinds of rule.
        (
            {"allow_local": False, "allow": ["ip:127.0.0.2"], "deny": ["country:DE"]},
            "127.0.0.2",
            denied("deny country:DE"),
        ),
        (
            {"allow_local": False, "allow": ["country:US"], "deny": ["127.0.0.3"]},
            "127.0.0.3",
            denied("deny 127.0.0.3"),
        ),
        (
            {"allow_local": False, "allow": ["tz:Europe/Berlin"], "deny": ["country:US"]},
            "127.0.0.2",
            allowed("allow tz:Europe/Berlin"),
        ),
        # allow_local beats them all.
        ({"deny": ["country:DE"]}, "127.0.0.2", allowed("allow_local")),
        # Within a list: address rules first, then countries, then time zones;
        # among duplicates the first written.
        ({"allow_local": False, "deny": ["country:DE", "127.0.0.0/8"]}, "127.0.0.2", denied("deny 127.0.0.0/8")),
        (
            {"allow_local": False, "deny": ["tz:Europe/Berlin", "country:DE"]},
            "127.0.0.2",
            denied("deny country:DE"),
        ),
        ({"allow_local": False, "deny": ["country:de", "country:DE"]}, "127.0.0.2", denied("deny country:de")),
    ],
)
def test_place_rules(database: Path, config: dict[str, object], host: str, expected: Decision) -> None:
    assert acl(database, **config).check(host) == expected


def test_the_database_is_asked_only_when_no_address_rule_decided(database: Path) -> None:
    access = acl(database, allow_local=False, deny=["127.0.0.3"], allow=["127.0.0.4", "country:DE"])
    assert access.maxmind is not None
    access.maxmind.locate.cache_clear()
    assert [access.check(host).rule for host in ("127.0.0.3", "127.0.0.4")] == ["deny 127.0.0.3", "allow 127.0.0.4"]
    assert access.maxmind.locate.cache_info().currsize == 0
    # A database given to a list without place rules is never asked.
    plain = acl(database, allow_local=False, deny=["127.0.0.3"])
    assert (plain.check("127.0.0.2"), plain.check("127.0.0.3")) == (allowed("default allow"), denied("deny 127.0.0.3"))
    assert access.maxmind.locate.cache_info().currsize == 0


def test_relative_to_the_given_directory(database: Path, tmp_path: Path) -> None:
    relative = AccessList.from_config({"allow": ["country:DE"], "maxmind": {"database": "geo.mmdb"}}, str(tmp_path))
    assert relative == acl(database, allow=["country:DE"])
    assert relative.maxmind is not None and relative.maxmind.path == str(database)


# -------------------------------------------------------- configuration files


def routes(top: str = "", **own_acl: str) -> str:
    """A route file: the top-level acl C{top}, and a route r with its own acl if given."""
    text = f"acl: {top}\n" if top else ""
    text += "routes:\n  r:\n    scheme: tcp4\n    bind: 127.0.0.1\n    port: '0:22'\n"
    if own_acl:
        text += "    acl: {" + ", ".join(f"{k}: {v}" for k, v in own_acl.items()) + "}\n"
    return text


def write_routes(directory: Path, text: str, **names: Path) -> Path:
    """Write C{text} as routes.yml with each placeholder of C{names} spelt out."""
    path = directory / "routes.yml"
    for placeholder, value in {**names, "ROUTES": path}.items():
        text = text.replace(placeholder, str(value))
    return write_config(directory, text)


@pytest.mark.parametrize(
    "text, where, message",
    [
        (routes(allow="[country:DE]"), "route 'r': field 'acl.allow[0]'", "'country:DE' needs a MaxMind database"),
        (routes(top="{deny: [tz:Asia/Tokyo]}"), "field 'acl.deny[0]'", "'tz:Asia/Tokyo' needs a MaxMind database"),
        # A route's acl replaces the top-level one whole, database included.
        (
            routes(top="{maxmind: {database: DB}}", deny="['10.0.0.0/8', country:US]"),
            "route 'r': field 'acl.deny[1]'",
            "'country:US' needs a MaxMind database",
        ),
        (
            routes(allow="[country:usa]", maxmind="{database: DB}"),
            "route 'r': field 'acl.allow[0]'",
            "'country:usa' is not a country; expected a two-letter ISO 3166-1 code",
        ),
        (
            routes(top="{deny: [tz:Nowhere], maxmind: {database: DB}}"),
            "field 'acl.deny[0]'",
            "'tz:Nowhere' is not a time zone; expected an IANA Area/City name",
        ),
        (
            routes(maxmind="DB"),
            "route 'r': field 'acl.maxmind'",
            "expected a mapping with a database, got str",
        ),
        (
            routes(maxmind="{path: DB}"),
            "route 'r': field 'acl.maxmind'",
            "unknown key 'path'; the only key is database",
        ),
        (
            routes(maxmind="{database: ''}"),
            "route 'r': field 'acl.maxmind.database'",
            "expected the path of a MaxMind database file, got ''",
        ),
        (
            routes(maxmind="{database: DB.missing}"),
            "route 'r': field 'acl.maxmind.database'",
            "cannot read DB.missing: No such file or directory",
        ),
        (
            routes(top="{maxmind: {database: ROUTES}}"),
            "field 'acl.maxmind.database'",
            "ROUTES is not a MaxMind database, or is damaged",
        ),
    ],
)
def test_config_errors(database: Path, tmp_path: Path, text: str, where: str, message: str) -> None:
    """Each message names the route file, the route and the field, and any database file."""
    path = write_routes(tmp_path, text, DB=database)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    expected = f"{path}: {where}: {message}".replace("ROUTES", str(path)).replace("DB", str(database))
    assert str(error.value).startswith(expected)


def test_a_relative_database_is_next_to_the_route_file(database: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_routes(tmp_path, routes(top="{deny: [country:US], maxmind: {database: geo.mmdb}}"))
    monkeypatch.chdir("/")
    maxmind = load_config(str(path)).routes[0].acl.maxmind
    assert maxmind is not None and maxmind.path == str(database)


def test_routes_share_one_reader_and_a_reload_rereads_a_changed_file(database: Path, tmp_path: Path) -> None:
    text = (
        routes(top="{allow_local: false, deny: [country:US], maxmind: {database: DB}}")
        + "  own: {scheme: tcp4, bind: 127.0.0.1, port: '0:22', acl: {deny: [country:DE], maxmind: {database: DB}}}\n"
    )
    path = write_routes(tmp_path, text, DB=database)
    config = load_config(str(path))
    top, own = (route.acl for route in config.routes)
    assert top.maxmind is not None and top.maxmind is own.maxmind
    assert load_config(str(path)) == config  # a reload finds nothing changed
    write_database(tmp_path / "new.mmdb", {"127.0.0.2/32": city("US", "America/Chicago")}).rename(database)
    reloaded = load_config(str(path))
    assert reloaded.routes[0].acl != top
    assert (top.check("127.0.0.2"), reloaded.routes[0].acl.check("127.0.0.2")) == (
        allowed("default allow"), denied("deny country:US"),
    )


# ------------------------------------------------------------- a real relay


def test_relay_admits_and_refuses_by_country(database: Path, tmp_path: Path) -> None:
    with Target() as target:
        text = (
            "acl: {default: deny, allow_local: false, allow: [country:DE], deny: [tz:America/New_York],"
            " maxmind: {database: DB}}\nroutes:\n" + tcp_route(target.port, "r")
        )
        with Relay(write_routes(tmp_path, text, DB=database)) as relay:
            port = relay.ports["r"]
            with connect_from("127.0.0.2", port) as sock:
                assert echoes(sock)
            accepted = target.accepted
            assert refused_from("127.0.0.3", port)
            denied_event = relay.wait_for("denied")[0]
            assert denied_event["client"].startswith("127.0.0.3:")
            assert denied_event["rule"] == "deny tz:America/New_York"
            assert target.accepted == accepted
            # A new release of the database, renamed into place, and a reload.
            write_database(tmp_path / "new.mmdb", {"127.0.0.3/32": city("DE", "Europe/Berlin")}).rename(database)
            relay.process.send_signal(signal.SIGHUP)
            reload = relay.wait_for("reload")[0]
            assert reload["changed"] == "r (acl)"
            with connect_from("127.0.0.3", port) as sock:
                assert echoes(sock)


@pytest.mark.parametrize("check", CHECKS, ids=["twistd", "python -m"])
def test_check_and_dump(database: Path, tmp_path: Path, check: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    text = routes(top="{default: deny, allow: [country:DE, 10.0.0.0/8], deny: [tz:Asia/Tokyo], maxmind: {database: DB}}")
    path = write_routes(tmp_path, text, DB=database)
    line = check(path)
    assert (line.returncode, line.stderr) == (0, "")
    assert line.stdout == "r: tcp4 127.0.0.1:0 -> localhost:22 (acl allow_local 1 deny 2 allow default deny, splice auto)\n"
    # The database by its absolute path, so that the dump loads back from anywhere.
    config = load_config(str(path))
    dumped = check(path, "--dump")
    assert (dumped.returncode, dumped.stdout) == (0, dump(config))
    assert yaml.safe_load(dumped.stdout)["routes"]["r"]["acl"]["maxmind"] == {"database": str(database)}
    assert parse_config(dumped.stdout, "dumped.yml").routes == config.routes
