"""The `dynzoo` command line and the torch.hub entrypoints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynzoo
from dynzoo.cli import format_table, main

ROOT = Path(__file__).resolve().parents[1]


def test_list_shows_every_model_with_computed_params(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out
    for name in dynzoo.list_dynzoo_models():
        assert name in out
    # fmdconv_resnet18's computed count equals the authors' (45,203,400), shown as a match
    line = next(l for l in out.splitlines() if l.startswith('fmdconv_resnet18 '))
    assert '45,203,400' in line and ' exact ' in line


def test_info_breaks_parameters_down(capsys):
    assert main(['info', 'fmdconv_resnet18']) == 0
    out = capsys.readouterr().out
    assert 'kernel_banks' in out and 'layer4' in out and 'fmdconv_resnet18.untrained' in out  # no weights exist
    # the per-part rows add up to the model's total
    rows = [l.split() for l in out.splitlines() if l.startswith(('conv1 ', 'bn1 ', 'layer', 'fc '))]
    assert sum(int(r[1].replace(',', '')) for r in rows) == 45_203_400


def test_info_unknown_model_is_an_error(capsys):
    assert main(['info', 'fmdconv_resnet19']) == 2
    assert "unknown dynzoo model 'fmdconv_resnet19'" in capsys.readouterr().err


def test_report_checks_a_family(tmp_path, capsys):
    out_json = tmp_path / 'report.json'
    assert main(['report', '--family', 'fmdconv_resnet18', '--img-size', '64', '--no-macs',
                 '--output', str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [r['model'] for r in rows] == ['fmdconv_resnet18']
    assert rows[0]['vs_paper'] == 'exact' and rows[0]['forward'] == 'ok' and rows[0]['check'] == 'ok'


def test_paper_match_respects_printed_precision():
    from dynzoo.cli import paper_match
    assert paper_match(45_203_400, 45_203_400) == 'exact'
    assert paper_match(45_203_401, 45_203_400) == '+1'
    assert paper_match(44_901_208, 44_900_000) == '~'        # "44.90 M"
    assert paper_match(44_951_208, 44_900_000) == '+51,208'
    assert paper_match(1, None) == '-'


def test_weights_lists_the_index(capsys):
    assert main(['weights']) == 0
    out = capsys.readouterr().out
    assert 'weights index:' in out


def test_python_m_dynzoo_runs():
    r = subprocess.run([sys.executable, '-m', 'dynzoo', 'list', '--family', 'fmdconv_mobilenetv2_050'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'fmdconv_mobilenetv2_050' in r.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--version'])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f'dynzoo {dynzoo.__version__}'


def test_every_tool_verb_delegates_to_its_main(capsys):
    """``dynzoo VERB ...`` is ``dynzoo.tools.VERB.main([...])``: each tool's own parser answers ``--help``."""
    from dynzoo.cli import TOOLS
    for verb in TOOLS:
        with pytest.raises(SystemExit) as e:
            main([verb, '--help'])
        assert e.value.code == 0 and f'dynzoo {verb}' in capsys.readouterr().out, verb


def test_format_table_aligns_columns():
    text = format_table([{'a': 'x', 'n': '1,000'}, {'a': 'long', 'n': '5'}])
    lines = text.splitlines()
    assert len(lines[0]) == len(lines[1]) and lines[0].endswith("    n")
    assert lines[2].endswith('1,000') and lines[3].endswith('    5')


def test_hubconf_has_every_model_and_loads_offline():
    import hubconf  # noqa: F401  (root of the checkout is on sys.path under pytest's rootdir)
    for name in dynzoo.list_dynzoo_models():
        assert callable(getattr(hubconf, name))
    model = torch.hub.load(str(ROOT), 'fmdconv_mobilenetv2_050', source='local', num_classes=5)
    assert model.num_classes == 5
    with pytest.raises(dynzoo.PretrainedUnavailableError):
        torch.hub.load(str(ROOT), 'fmdconv_mobilenetv2_050', source='local', pretrained=True)
