"""The `dynzoo` command line and the torch.hub entrypoints."""
import json
import os
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
    captured = capsys.readouterr()
    out = captured.out
    for name in dynzoo.list_dynzoo_models():
        assert name in out
    n = len(dynzoo.list_dynzoo_models())
    assert f'[1/{n}] ' in captured.err and f'[{n}/{n}] ' in captured.err  # progress, on stderr
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


def test_report_flags_a_miss_of_a_rounded_figure(tmp_path, capsys):
    """A rounded paper figure is compared at its printed precision: A2D2C's MobileNetV2 x0.75 misses the 5.08 M of
    its Table 3, which the report flags and explains with the figure's source instead of printing "ok"."""
    out_json = tmp_path / 'report.json'
    assert main(['report', '--family', 'a2d2c_mobilenetv2_075', '--no-macs', '--output', str(out_json)]) == 0
    row, = json.loads(out_json.read_text())
    assert row['check'] == 'MISS params' and row['vs_paper'].endswith('%)')
    out = capsys.readouterr().out
    assert '1 miss a paper figure' in out and 'a2d2c_mobilenetv2_075: params' in out and 'Table 3' in out
    assert main(['report', '--family', 'a2d2c_mobilenetv2_075', '--no-macs', '--strict']) == 1


def test_report_compares_macs():
    """MACs are checked too: A2D2C+ ResNet-18 counts 3.5x the 1.93 G of the paper's Table 4."""
    from dynzoo.cli import is_miss, paper_match
    assert is_miss(paper_match(6_892_891_136, 1.93e9)) and not is_miss(paper_match(1_931_000_000, 1.93e9))


@pytest.mark.parametrize('argv, message', [
    (['export', 'nosuchmodel', '--format', 'onnx'], 'nosuchmodel'),
    (['train', '--config', 'nosuchrecipe'], "recipe 'nosuchrecipe' is neither a file"),
    (['train', '--model', 'nosuchmodel', '--epochs', '1'], "unknown model 'nosuchmodel'"),
    (['convert', '--model', 'fmdconv_resnet18', '--checkpoint', '/nonexistent.pth', '--out', '/nonexistent'],
     'does not exist'),
    (['publish', '--train-dir', '/nonexistent'], 'no results.json'),
    (['bench', 'nosuchmodel'], "unknown model 'nosuchmodel'"),
    (['timm', 'nosuchscript.py'], "no timm script 'nosuchscript.py'"),
    (['info', 'fmdconv_resnet19'], "unknown dynzoo model 'fmdconv_resnet19'"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    """A bad request ends with exit status 2 and one line on stderr naming the problem, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and 'Traceback' not in err, err


def test_bad_flags_are_usage_errors(capsys):
    for verb in ('list', 'export', 'train', 'timm'):
        with pytest.raises(SystemExit) as e:
            main([verb, '--no-such-flag'])
        assert e.value.code == 2 and 'error:' in capsys.readouterr().err


def test_timm_runs_a_script_as_main(tmp_path, capsys, monkeypatch):
    """``dynzoo timm SCRIPT ARGS`` runs SCRIPT as ``__main__`` with ``sys.argv`` set, its folder on ``sys.path``,
    dynzoo's models registered; ``$TIMM_SCRIPTS_DIR`` resolves a bare name, and the exit status comes back."""
    (tmp_path / 'helper_mod.py').write_text('VALUE = 7\n')
    (tmp_path / 'probe.py').write_text(
        'import sys, timm, helper_mod\n'
        'if __name__ == "__main__":\n'
        '    print(sys.argv[1:], helper_mod.VALUE, timm.is_model("fmdconv_resnet18"))\n'
        '    sys.exit(int(sys.argv[1]))\n')
    monkeypatch.setenv('TIMM_SCRIPTS_DIR', str(tmp_path))
    argv_before = list(sys.argv)
    assert main(['timm', 'probe.py', '0', '--flag']) == 0
    assert capsys.readouterr().out.strip() == "['0', '--flag'] 7 True"
    assert main(['timm', str(tmp_path / 'probe.py'), '3']) == 3
    assert sys.argv == argv_before and str(tmp_path) not in sys.path


def test_timm_runner_under_torchrun(tmp_path):
    """``torchrun -m dynzoo timm SCRIPT`` runs the script on every rank, with the rank's environment."""
    (tmp_path / 'probe.py').write_text(
        'import os, timm\nprint("rank", os.environ["RANK"], timm.is_model("fmdconv_resnet18"))\n')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m', 'dynzoo',
                        'timm', str(tmp_path / 'probe.py')], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(l for l in r.stdout.splitlines() if l.startswith('rank')) == ['rank 0 True', 'rank 1 True']


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
    with pytest.raises(dynzoo.PretrainedUnavailableError):  # a model without any weights
        torch.hub.load(str(ROOT), 'attnet_xxs', source='local', pretrained=True)
