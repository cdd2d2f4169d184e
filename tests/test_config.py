"""Site configuration: the shipped file loads, and every mistake names file, site and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from radonc_backup.backup_target import open_backup
from radonc_backup.config import DEFAULT_CONFIG, load_site, site_names
from radonc_backup.errors import ConfigError, SecretMissing

GOOD = """
[defaults]
retries = 5

[ALPHA]
timezone = "America/Chicago"
default_source = "aria"
default_backup = "pacs"
script_ae = "RADONC_BACKUP"
[ALPHA.sources.aria]
type = "aria"
aet = "ARIA_AE"
ip = "127.0.0.1"
port = 105
[ALPHA.backup_targets.pacs]
type = "orthanc"
aet = "PACS"
ip = "127.0.0.1"
port = 4242
rest_url = "http://127.0.0.1:8042"
password_env = "ALPHA_PACS_PASSWORD_FOR_TEST"
[ALPHA.settings]
batch_size = 25

[BETA]
default_source = "aria"
default_backup = "pacs"
script_ae = "RADONC_BACKUP"
[BETA.sources.aria]
type = "aria"
aet = "ARIA_B"
ip = "127.0.0.1"
port = 105
[BETA.backup_targets.pacs]
type = "orthanc"
aet = "PACS_B"
ip = "127.0.0.1"
port = 4242
rest_url = "http://127.0.0.1:8042"
password_env = "BETA_PACS_PASSWORD_FOR_TEST"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sites.toml"
    path.write_text(text)
    return path


def test_shipped_config_has_valid_demo_and_example_sites() -> None:
    assert {"DEMO", "UCLA"} <= set(site_names(DEFAULT_CONFIG))
    demo = load_site("DEMO", DEFAULT_CONFIG)
    assert demo.sources["aria"].type == "aria"
    assert demo.backup_targets["orthanc"].type == "orthanc"
    ucla = load_site("UCLA", DEFAULT_CONFIG)
    assert {s.type for s in ucla.sources.values()} == {"aria", "mim", "mosaiq"}
    assert ucla.settings.retries == 7


def test_defaults_are_inherited_and_site_settings_win(tmp_path: Path) -> None:
    site = load_site("ALPHA", write(tmp_path, GOOD))
    assert site.settings.retries == 5
    assert site.settings.batch_size == 25
    assert site.tz.key == "America/Chicago"


def test_config_location_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADONC_BACKUP_CONFIG", str(write(tmp_path, GOOD)))
    assert load_site("BETA").sources["aria"].aet == "ARIA_B"


@pytest.mark.parametrize("old,new,expected", [
    ("port = 105\n[ALPHA.backup", 'port = "105"\n[ALPHA.backup', "sources.aria.port"),
    ('aet = "ARIA_AE"', 'aet = "ARIA_AE_TITLE_TOO_LONG"', "sources.aria.aet"),
    ('default_source = "aria"\ndefault_backup = "pacs"\nscript_ae = "RADONC_BACKUP"\n[ALPHA',
     'default_source = "arai"\ndefault_backup = "pacs"\nscript_ae = "RADONC_BACKUP"\n[ALPHA',
     "default_source 'arai' is not one of the sources"),
    ('default_backup = "pacs"\nscript_ae = "RADONC_BACKUP"\n[ALPHA',
     'default_backup = "pcas"\nscript_ae = "RADONC_BACKUP"\n[ALPHA',
     "default_backup 'pcas'"),
    ('timezone = "America/Chicago"', 'timezone = "Mars/Olympus"', "unknown timezone"),
    ('type = "aria"\naet = "ARIA_AE"', 'type = "varian"\naet = "ARIA_AE"', "sources.aria"),
    ("batch_size = 25", "batch_size = 0", "settings.batch_size"),
    ("batch_size = 25", "bach_size = 25", "settings.bach_size"),
    # A restore to the R&V itself never opens more associations than the R&V allows; a backup
    # target has no such key.
    ("batch_size = 25", 'batch_size = 25\n[ALPHA.restore_targets.rebuilt]\ntype = "dicom_scp"\n'
     'aet = "ARIA_AE"\nip = "127.0.0.1"\nport = 105\nmax_associations = 8',
     "restore_targets.rebuilt is source aria (ARIA_AE): its max_associations 8 is more than the "
     "source's 4"),
    ('rest_url = "http://127.0.0.1:8042"\npassword_env = "ALPHA',
     'rest_url = "http://127.0.0.1:8042"\nmax_associations = 2\npassword_env = "ALPHA',
     "key 'backup_targets.pacs.max_associations': Extra inputs are not permitted"),
])
def test_config_errors_name_file_site_and_key(tmp_path: Path, old: str, new: str,
                                             expected: str) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_site("ALPHA", path)
    message = str(err.value)
    assert str(path) in message and "site ALPHA" in message and expected in message
    # A mistake in ALPHA never stops BETA.
    assert load_site("BETA", path).name == "BETA"


def test_missing_site_and_missing_file_and_bad_toml(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"no site 'GAMMA' \(sites: ALPHA, BETA\)"):
        load_site("GAMMA", path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_site("ALPHA", tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_site("ALPHA", write(tmp_path, "[ALPHA\n"))


def test_missing_secret_breaks_only_its_own_site(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.delenv("ALPHA_PACS_PASSWORD_FOR_TEST", raising=False)
    monkeypatch.setenv("BETA_PACS_PASSWORD_FOR_TEST", "s3cret")
    with pytest.raises(SecretMissing) as err:
        open_backup(load_site("ALPHA", path))
    assert "site ALPHA" in str(err.value) and "ALPHA_PACS_PASSWORD_FOR_TEST" in str(err.value)
    assert "PACS" in str(err.value)
    beta = open_backup(load_site("BETA", path))
    assert beta.aet == "PACS_B"


def test_passwords_are_not_accepted_in_the_file(tmp_path: Path) -> None:
    text = GOOD.replace('password_env = "ALPHA_PACS_PASSWORD_FOR_TEST"', 'password = "hunter2"')
    with pytest.raises(ConfigError, match="backup_targets.pacs.*password"):
        load_site("ALPHA", write(tmp_path, text))


def test_a_directory_given_as_config_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_site("DEMO", tmp_path)
    assert str(err.value) == (f"{tmp_path}: is a directory, not a config file (set "
                              "RADONC_BACKUP_CONFIG or pass --config with the TOML file)")


def test_a_literal_password_is_refused_without_being_echoed(tmp_path: Path) -> None:
    text = DEFAULT_CONFIG.read_text().replace(
        'password_env = "RADONC_DEMO_BACKUP_PASSWORD"', 'password = "hunter2-secret"')
    path = tmp_path / "sites.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_site("DEMO", path)
    assert "backup_targets.orthanc.password" in str(err.value)
    assert "hunter2" not in str(err.value) and "password_env" in str(err.value)


@pytest.mark.parametrize("profile, expected", [
    ("orthanc", ("relational", "uid_list", True, 0)),
    ("aria", ("hierarchical", "uid_list", False, 0)),
    ("mim", ("relational", "uid_list", False, 0)),
    ("strict", ("hierarchical", "one_uid", False, 500)),
])
def test_a_profile_sets_the_query_defaults_and_written_keys_win(
        tmp_path: Path, profile: str, expected: tuple[object, ...]) -> None:
    text = GOOD.replace('port = 105\n', f'port = 105\nprofile = "{profile}"\n')
    src = load_site("ALPHA", write(tmp_path, text)).sources["aria"]
    assert (src.query, src.retrieve, src.relational_move, src.max_find_results) == expected
    text = GOOD.replace('port = 105\n', f'port = 105\nprofile = "{profile}"\n'
                                        'retrieve = "series"\nmax_find_results = 42\n')
    src = load_site("ALPHA", write(tmp_path, text)).sources["aria"]
    assert (src.retrieve, src.max_find_results) == ("series", 42)


def test_an_unknown_profile_names_the_known_ones(tmp_path: Path) -> None:
    text = GOOD.replace('port = 105\n', 'port = 105\nprofile = "varian"\n')
    with pytest.raises(ConfigError) as raised:
        load_site("ALPHA", write(tmp_path, text))
    message = str(raised.value)
    assert "ALPHA" in message and "profile" in message and "'strict'" in message, message
    assert len(message.splitlines()) == 1, message
