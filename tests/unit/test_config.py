import argparse
import json

import pytest

from invoker.cli import main
from invoker.config import (
    LOG_OBJECTS_FACTOR,
    PARSED_JSON_FACTOR,
    READ_BACK_CHUNK,
    RECORD_OBJECT_BYTES,
    Config,
    add_config_arguments,
    load_config,
    mask_url,
)


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p.parse_args(argv)


def test_precedence_flags_over_env_over_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('batch_size = 7\nlinger_ms = 3\nmax_activations = 5\n'
                    '[kind_images]\n"python:3" = "from-toml"\n')
    env = {"INVOKER_LINGER_MS": "9", "INVOKER_MAX_ACTIVATIONS": "6"}
    cfg = load_config(parse(["--config", str(toml), "--max-activations", "8"]), env)
    assert (cfg.batch_size, cfg.linger_ms, cfg.max_activations) == (7, 9, 8)
    assert cfg.kind_images == {"python:3": "from-toml"}


def test_mapping_from_env_json():
    cfg = load_config(parse([]), {"INVOKER_PREWARM": '{"python:3": 2}'})
    assert cfg.prewarm == {"python:3": 2}


def test_unknown_toml_key_is_an_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("bach_size = 1\n")
    with pytest.raises(ValueError, match="bach_size"):
        load_config(parse(["--config", str(toml)]), {})


def test_invalid_bounds_are_refused():
    with pytest.raises(ValueError, match="low_watermark"):
        Config(record_channel_size=10, record_channel_low_watermark=10)
    with pytest.raises(ValueError, match="default limits"):
        Config(default_memory_mb=4096)


def test_worst_case_bound_adds_every_buffer():
    cfg = Config(max_poll_records=2, read_ahead=3, max_activations=4, record_channel_size=5,
                 record_channel_low_watermark=1, max_writes_in_flight=2, batch_size=6,
                 max_publishes_in_flight=3, max_message_bytes=100, max_result_bytes=1000,
                 max_logs_kb=1, default_logs_kb=1, fetch_max_bytes=10_000,
                 kafka_max_message_bytes=400)
    records, size = cfg.worst_case_buffered()
    assert records == 2 + 3 + 4 + 5 + 2 * 6 + 3 * 6
    # waiting messages may be as large as the topic takes (400), running ones max_message_bytes
    # (three times: as consumed, params, /run body) and, at the end, the answer twice, the log
    # lines as objects and the record; a record holds its encoding and a few objects, a
    # completion awaiting its ack at most a record's encoding; and, for re-executions, the
    # stored records read back (2 writes of 6); one parse at a time: here READ_BACK_CHUNK
    # records read back are the largest
    record = cfg.max_record_bytes + RECORD_OBJECT_BYTES
    assert size == (5 * 400 + 4 * (3 * 100 + 2 * 1000 + LOG_OBJECTS_FACTOR * 1024 + record)
                    + (17 + 12) * record + 18 * cfg.max_record_bytes + 10_000
                    + 12 * 2 * cfg.max_record_bytes  # CouchDB: documents and body
                    + PARSED_JSON_FACTOR * READ_BACK_CHUNK * cfg.max_record_bytes)


def test_mask_url():
    assert mask_url("http://admin:s3cret@db:5984/acts") == "http://***@db:5984/acts"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"


def test_print_config_masks_secrets(capsys, monkeypatch):
    monkeypatch.setenv("INVOKER_STORE_URL", "http://admin:s3cret@127.0.0.1:5984/acts")
    assert main(["run", "--print-config", "--batch-size", "42"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    shown = json.loads(out)
    assert shown["store_url"] == "http://***@127.0.0.1:5984/acts"
    assert shown["batch_size"] == 42
