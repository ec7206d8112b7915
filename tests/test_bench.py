"""``dynzoo.tools.bench``: the static twin, counterpart mapping, and a tiny end-to-end run of the CLI (no timing asserted)."""
import json
import os
import platform
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynzoo  # noqa: F401
from dynzoo.tools.bench import main, set_cpu_allocator, static_twin, timm_counterpart
from dynzoo.utils.flops import count_params
from dynzoo.layers.dynamic import DynamicConv2dBase, get_default_strategy
from dynzoo.utils.metrics import N_IMAGENET


def test_static_twin_swaps_every_dynamic_conv():
    model = timm.create_model('fmdconv_resnet18')
    twin = static_twin(model)
    assert not any(isinstance(m, DynamicConv2dBase) for m in twin.modules())
    assert sum(isinstance(m, DynamicConv2dBase) for m in model.modules()) == 16  # the original is untouched
    assert count_params(twin) == count_params(timm.create_model('resnet18')) == 11_689_512
    conv = twin.layer4[1].conv2
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (512, 512, 3, 3) and conv.bias is None
    assert [n for n, _ in conv.named_parameters()] == ['weight']  # a plain static conv, nothing more
    x = torch.randn(2, 512, 4, 4)
    with torch.no_grad():  # the extra conditioning input a DMF conv takes is ignored, the result is nn.Conv2d's
        torch.testing.assert_close(conv(x, torch.randn(2, 6, 192)), F.conv2d(x, conv.weight, padding=1))
    with torch.no_grad():
        assert twin.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert static_twin(timm.create_model('resnet18')) is None


@pytest.mark.parametrize('name, static', [
    ('fmdconv_resnet18', 'resnet18'), ('odconv_resnet50_1x', 'resnet50'), ('fmdconv_mobilenetv2_050', 'mobilenetv2_050'),
    ('attnet_t1', 'convnext_nano'), ('dmf_xxs', 'mobilenetv2_100'), ('sgdm_cspdarknet_n', None),
])
def test_timm_counterpart(name, static):
    assert timm_counterpart(name) == static


def test_cli_end_to_end(tmp_path):
    out = tmp_path / 'bench'
    rc = main(['fmdconv_resnet18', '--batch-sizes', '2', '--train-batch-sizes', '2', '--img-size', '32',
                   '--repeats', '1', '--threads', '1', '--timer', 'cpu', '--no-timm', '--quiet',
                   '--accuracy', 'fmdconv_resnet18=73.21', '--allocator', 'default', '--out', str(out)])
    assert rc == 0
    assert {'bench.json', 'bench.csv', 'bench.md'} <= set(os.listdir(out))
    data = json.loads((out / 'bench.json').read_text())
    rows = {(r['model'], r['mode']): r for r in data['results']}
    assert set(rows) == {(m, mode) for m in ('fmdconv_resnet18', 'fmdconv_resnet18:static_twin')
                         for mode in ('eval', 'train')}
    dyn, twin = rows['fmdconv_resnet18', 'train'], rows['fmdconv_resnet18:static_twin', 'train']
    assert dyn['params'] == 45_203_400 and twin['params'] == 11_689_512
    assert dyn['macs'] > twin['macs'] > 0
    assert twin['ratio_twin'] == pytest.approx(1.0)
    assert dyn['ratio_twin'] == pytest.approx(dyn['cpu_ms'] / twin['cpu_ms'])
    epoch_s = N_IMAGENET / dyn['throughput']
    assert dyn['ies'] == pytest.approx(epoch_s / 0.7321) and dyn['rcs'] == pytest.approx(N_IMAGENET / dyn['ies'])
    assert rows['fmdconv_resnet18', 'eval']['ies'] is None  # IES / RCS use train time only
    assert get_default_strategy() == 'auto'  # restored after the run


def test_retain_allocator_in_a_benchmark_process():
    """``--allocator retain`` sets glibc's mallopt in the benchmark's own process and is recorded;
    run in a subprocess, so the test worker's allocator is left alone."""
    code = ('from dynzoo.tools.bench import set_cpu_allocator, environment; '
            'assert environment()["allocator"] == "default"; '
            'mode = set_cpu_allocator("retain"); '
            'assert environment()["allocator"] == mode; print(mode)')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = 'retain' if platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc' else 'default'
    assert proc.stdout.strip() == expected
    with pytest.raises(ValueError, match='allocator'):
        set_cpu_allocator('jemalloc')


def test_compare_table_dynzoo_vs_static(tmp_path, capsys):
    """``dynzoo bench compare`` without the authors' code: dynzoo, its reparameterized form and the static
    counterpart, each row's ratios its times over the static counterpart's; tiny input, one round."""
    from dynzoo.tools.bench.compare import COMPARED
    out = tmp_path / 'cmp'
    assert main(['compare', 'fmdconv_resnet18', '--img-size', '32', '--batch-sizes', '2', '--train-batch-sizes', '2',
                 '--repeats', '1', '--warmup', '0', '--threads', '1', '--quiet', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / 'compare.json').read_text())
    rows = {(r['mode'], r['batch_size']): r for r in data['rows']}
    assert set(rows) == {('eval', 2), ('train', 2)}
    network = next(n for n in COMPARED if n.model == 'fmdconv_resnet18')
    reparam_params = count_params(dynzoo.reparameterize(timm.create_model('fmdconv_resnet18')))
    for (mode, _), r in rows.items():
        assert r['network'] == network.label and r['static'] == timm_counterpart('fmdconv_resnet18') == 'resnet18'
        assert set(r['time_ms']) == ({'dynzoo', 'dynzoo_reparam', 'static'} if mode == 'eval' else {'dynzoo', 'static'})
        for k, t in r['time_ms'].items():
            assert r['ratio_static'][k] == pytest.approx(t / r['time_ms']['static'])
        assert r['authors_over_dynzoo'] is None and r['authors_vs_dynzoo_max_rel_diff'] is None
        assert r['params'] == {'dynzoo': 45_203_400, 'static': 11_689_512, 'dynzoo_reparam': reparam_params}
    eval_row = rows['eval', 2]['ratio_static']
    assert f"| {network.label} (resnet18) | n/a / {eval_row['dynzoo']:.2f} |" in printed
    assert (out / 'compare.md').read_text().count(network.label) == 2 + len(rows)  # summary, ms rows, parity


def test_compare_authors_loader_names_what_is_missing(tmp_path, capsys):
    from dynzoo.tools.bench.compare import COMPARED, load_authors_model
    missing = tmp_path / 'nowhere'
    with pytest.raises(FileNotFoundError, match='nowhere.*does not exist'):
        load_authors_model(str(missing), COMPARED[0])
    (tmp_path / 'authors').mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkout of tianyu00824/FMDConv .*'FMDConv'.*git clone"):
        load_authors_model(str(tmp_path / 'authors'), COMPARED[0])
    (tmp_path / 'authors' / 'fmdconv').mkdir()  # a checkout without the file that builds the network
    with pytest.raises(FileNotFoundError, match='models/fmd_resnet.py'):
        load_authors_model(str(tmp_path / 'authors'), COMPARED[0])
    assert main(['compare', '--authors-dir', str(missing), '--quiet']) == 2
    assert 'nowhere' in capsys.readouterr().err
    assert main(['compare', 'resnet18', '--quiet']) == 2
    assert 'no compared network' in capsys.readouterr().err


def test_compare_records_no_path_of_the_machine(tmp_path):
    """The recorded command keeps every argument but writes the authors' folder as a placeholder."""
    from dynzoo.tools.bench.compare import recorded_command
    authors = str(tmp_path / 'authors')
    for argv, expected in [
        (['--authors-dir', authors, '--threads', '2'], 'p --authors-dir AUTHORS_DIR --threads 2'),
        (['--threads', '2', f'--authors-dir={authors}'], 'p --threads 2 --authors-dir=AUTHORS_DIR'),
        (['fmdconv_resnet18', '--quick'], 'p fmdconv_resnet18 --quick'),
    ]:
        assert recorded_command('p', argv) == expected


def test_gpu_benchmark_script_runs_on_cpu(tmp_path):
    """``scripts/gpu_benchmark.py --device cpu --quick``: the GPU script's smoke test (tiny input); it fills the
    marked section of the given markdown file and leaves the rest as it was, and a spent budget skips the rest."""
    md = tmp_path / 'BENCHMARKS.md'
    md.write_text('# head\n\n<!-- gpu_benchmark.py:begin -->\nold\n<!-- gpu_benchmark.py:end -->\n\n## tail\n')
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'gpu_benchmark.py')
    cmd = [sys.executable, script, '--device', 'cpu', '--quick', '--models', 'fmdconv_resnet18', '--img-size', '32',
           '--batch-sizes', '2', '--train-batch-sizes', '2', '--configs', 'bf16-cl', '--out', str(tmp_path),
           '--benchmarks-md', str(md)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / 'gpu.json').read_text())
    assert data['device'].startswith('CPU') and data['skipped'] == []
    assert [c['config'] for c in data['configs']] == ['bf16-cl']
    assert data['configs'][0]['amp'] == 'bf16' and data['configs'][0]['channels_last']
    for c in data['configs']:
        assert {(r['mode'], r['batch_size']) for r in c['rows']} == {('eval', 2), ('train', 2)}
    text = md.read_text()
    assert text.startswith('# head\n') and text.endswith('\n## tail\n') and 'old' not in text
    assert '### bf16-cl' in text and 'FMDConv ResNet-18 (resnet18)' in text
    proc = subprocess.run(cmd[:-2] + ['--benchmarks-md', '', '--budget', '0'], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / 'gpu.json').read_text())['skipped'] == ['bf16-cl: fmdconv_resnet18']
