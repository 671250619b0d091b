"""Every setting is documented once (invoker.config.setting) and shown the same way in
``invoker run --help``, ``invoker recorder --help`` and the README's settings tables."""

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest

from invoker import cli
from invoker.config import (
    COMMANDS,
    GROUPS,
    MARKDOWN_BEGIN,
    MARKDOWN_END,
    RECORDER,
    RUN,
    Config,
    default_text,
    env_name,
    main,
    markdown,
    readme_section,
    setting,
    settings_by_group,
    write_readme,
)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = dataclasses.fields(Config)


def command_help(command: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``invoker COMMAND --help`` as printed, unwrapped (each option on one or two lines)."""
    monkeypatch.setenv("COLUMNS", "10000")
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command")
    return subcommands.choices[command].format_help()


def option_text(help_text: str, flag: str) -> str:
    """The lines of ``help_text`` that belong to ``flag``: its own and a help line below it."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(flag + " "))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 8) and lines[end].strip():
        end += 1
    return " ".join(lines[start:end])


def test_every_setting_has_help_unit_group_and_readers():
    for f in FIELDS:
        meta = f.metadata
        assert meta.get("help"), f"{f.name}: no help; declare it with setting(..., help=...)"
        assert not meta["help"].endswith("."), f"{f.name}: help ends with a period"
        assert meta["group"] in GROUPS, f.name
        assert isinstance(meta["unit"], str), f.name
        assert meta["commands"] and set(meta["commands"]) <= set(COMMANDS), f.name
    assert sum(len(fields) for fields in settings_by_group().values()) == len(FIELDS)


def test_a_setting_without_help_or_with_an_unknown_group_is_refused():
    with pytest.raises(ValueError):
        setting(1, group="kafka", help="a typo in the group")
    with pytest.raises(ValueError):
        setting(1, group="Kafka", help="")
    for commands in (("status",), ()):
        with pytest.raises(ValueError):
            setting(1, group="Kafka", help="x", commands=commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_setting_the_command_reads_with_meaning_unit_default_env(
        command, monkeypatch):
    text = command_help(command, monkeypatch)
    shown = settings_by_group(command)
    assert list(shown) == [g for g in GROUPS if g in shown]
    for group, fields in shown.items():
        assert f"{group} settings:" in text
        for f in fields:
            option = option_text(text, "--" + f.name.replace("_", "-"))
            assert f.metadata["help"] in option
            assert f"Default: {default_text(f, with_unit=True)}." in option
            assert f.metadata["unit"] in option
            assert f"Env: {env_name(f.name)}." in option
    readers = {f.name for fields in shown.values() for f in fields}
    for f in FIELDS:
        if f.name not in readers:
            assert "--" + f.name.replace("_", "-") + " " not in text


def test_defaults_shown_are_the_real_ones():
    by_name = {f.name: f for f in FIELDS}
    assert default_text(by_name["batch_size"], with_unit=True) == "100 records"
    assert default_text(by_name["fetch_max_bytes"]) == "4194304 (4 MiB)"
    assert default_text(by_name["overflow_enabled"]) == "false"
    assert json.loads(default_text(by_name["kind_images"])) == Config().kind_images
    assert default_text(by_name["invoker_id"]) == "invoker-<host>-<pid>"
    assert Config().invoker_id.startswith("invoker-")


def test_secret_defaults_are_masked():
    @dataclasses.dataclass
    class Probe:
        url: str = setting("http://admin:s3cret@db:5984/acts", group="store", help="a store",
                           secret=True)

    assert default_text(dataclasses.fields(Probe)[0]) == "http://***@db:5984/acts"
    assert next(f for f in FIELDS if f.name == "store_url").metadata["secret"]


def _attributes_read(source: str) -> set[str]:
    return set(re.findall(r"\b(?:config|cfg)\.(\w+)", source))


def test_recorder_help_lists_exactly_what_the_recorder_reads():
    """What the recorder's code reads from its Config (its module, the FeedService base, the
    last-resort handler and the CLI's start-up) is what ``invoker recorder --help`` shows."""
    sources = [(ROOT / path).read_text() for path in
               ("overflow/recorder.py", "invoker/service.py", "invoker/lastresort.py")]
    read = set().union(*map(_attributes_read, [*sources, inspect.getsource(cli._serve)]))
    if "overflow_brokers" in read:  # a property: overflow_bootstrap, else kafka_bootstrap
        read |= {"overflow_bootstrap", "kafka_bootstrap"}
    if "max_record_bytes" in read:  # a property of max_result_bytes and max_logs_kb
        read |= {"max_result_bytes", "max_logs_kb"}
    names = {f.name for f in FIELDS}
    shown = {f.name for fields in settings_by_group(RECORDER).values() for f in fields}
    assert read & names == shown


def test_each_command_refuses_flags_of_settings_it_does_not_read(capsys):
    with pytest.raises(SystemExit) as refused:
        cli.main(["recorder", "--max-activations", "3", "--print-config"])
    assert refused.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["run", "--recorder-id", "r1", "--print-config"])
    assert "unrecognized arguments: --recorder-id" in capsys.readouterr().err


def test_recorder_takes_a_config_file_with_daemon_settings(tmp_path, capsys):
    toml = tmp_path / "shared.toml"
    toml.write_text('max_activations = 7\nrecorder_group_id = "rg"\n'
                    '[prewarm]\n"python:3" = 2\n')
    assert cli.main(["recorder", "--config", str(toml), "--batch-size", "9",
                     "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["max_activations"], shown["recorder_group_id"], shown["batch_size"],
            shown["prewarm"]) == (7, "rg", 9, {"python:3": 2})


def test_readme_tables_are_the_generated_ones():
    text = (ROOT / "README.md").read_text()
    begin, end = readme_section(text)
    assert text[begin:end] == markdown(), (
        "README.md's settings tables differ from invoker/config.py: run `make docs` "
        "(python -m invoker.config --readme README.md)")


def test_markdown_has_a_row_per_setting_under_its_group():
    text = markdown()
    for group, fields in settings_by_group().items():
        heading = text.index(f"**{group[:1].upper()}{group[1:]}.**")
        for f in fields:
            row = next(line for line in text.splitlines() if line.startswith(f"| `{f.name}` |"))
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            assert cells[:4] == [f"`{f.name}`", f"`{env_name(f.name)}`",
                                 f"`{default_text(f)}`", f.metadata["unit"]]
            assert cells[4].startswith(f.metadata["help"])
            assert text.index(row) > heading
    assert "— `invoker recorder` only" in text and "— `invoker run` only" in text


def test_write_readme_replaces_only_between_the_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{MARKDOWN_BEGIN}\nstale\n{MARKDOWN_END}\nafter\n")
    assert main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text == f"# x\n\nbefore\n{MARKDOWN_BEGIN}\n{markdown()}{MARKDOWN_END}\nafter\n"
    assert write_readme(readme) is False
    assert "updated" in capsys.readouterr().out
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit) as failed:
        main(["--readme", str(readme)])
    assert failed.value.code == 1
    assert readme.read_text() == "no markers\n"


def test_run_reads_every_setting_but_the_recorders_own():
    assert {f.name for f in FIELDS if RUN not in f.metadata["commands"]} == {
        "recorder_id", "recorder_group_id", "recorder_metrics_port"}
