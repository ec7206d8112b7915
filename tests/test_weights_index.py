"""The weights index: the shipped index follows the schema of docs/weights.md, every listed model exists, and the
validator refuses entries that break the schema (so it can fail). The index in force is cached on its content, and
timm's ``.untrained`` tag marks exactly the models without weights."""
import copy
import json
import os
import re
from pathlib import Path

import pytest
import timm
from timm.models import get_arch_pretrained_cfgs

import dynzoo
from dynzoo.models import _hub as hub
from dynzoo.models._builder import known_tags
from dynzoo.tools.publish import IndexValidationError, update_index, validate_entry, validate_index

DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'weights.md'

GOOD_PUBLISHED = {
    'model': 'fmdconv_resnet18', 'tag': 'in1k', 'status': 'published',
    'hf_hub_id': 'dynzoo/fmdconv_resnet18.in1k', 'filename': 'model.safetensors',
    'sha256': 'ab' * 32, 'size': 180_000_000,
    'source': {'type': 'converted', 'repo': 'tianyu00824/FMDConv', 'url': 'https://github.com/tianyu00824/FMDConv',
               'commit': 'b1c6d7717bdaf836a9594323b37c4da5b5036ddf'},
    'dataset': {'name': 'imagenet-1k'},
    'metrics': [{'name': 'top1', 'value': 73.21, 'protocol': 'ImageNet-1k val, 224 center crop 0.875',
                 'measured_by': 'authors'}],
    'license': 'unknown',
}
GOOD_NOT_MIRRORED = {
    'model': 'attnet_t1', 'tag': 'in1k', 'status': 'not_mirrored',
    'source': {'type': 'authors_release', 'repo': 'price112/Attentive-Convolution',
               'url': 'https://github.com/price112/Attentive-Convolution'},
    'dataset': {'name': 'imagenet-1k'},
    'metrics': [],
    'license': 'mit',
}
GOOD_LOCAL = {  # the user's index: `dynzoo weights add attnet_xxs.digits FILE`
    'model': 'attnet_xxs', 'tag': 'digits', 'status': 'published', 'file': '/data/attnet_xxs_digits.safetensors',
    'sha256': 'ef' * 32, 'size': 10_000,
    'source': {'type': 'added', 'from': '/data/attnet_xxs_digits.safetensors', 'dynzoo_version': dynzoo.__version__},
    'dataset': {'name': 'sklearn/digits'}, 'metrics': [], 'license': 'unknown',
    'pretrained_cfg': {'num_classes': 10, 'input_size': [3, 32, 32]},
}
GOOD_TRAINED = {
    'model': 'attnet_xxs', 'tag': 'digits', 'status': 'published',
    'hf_hub_id': 'dynzoo/attnet_xxs.digits', 'filename': 'model.safetensors', 'sha256': 'cd' * 32, 'size': 10_000,
    'source': {'type': 'trained', 'recipe': 'attnet_xxs_digits', 'dynzoo_version': dynzoo.__version__},
    'dataset': {'name': 'sklearn/digits'},
    'metrics': [{'name': 'top1', 'value': 97.5, 'protocol': 'digits val split seed 0', 'measured_by': 'dynzoo'}],
    'license': 'mit',
}


def _shipped_index():
    return json.loads((Path(dynzoo.__file__).parent / 'weights_index.json').read_text())


def test_shipped_index_follows_schema():
    index = _shipped_index()
    validate_index(index)  # schema string, every entry, models registered, no duplicates


def test_shipped_index_entries_are_loadable_names():
    """Every entry names a registered model AND a registered pretrained tag, so `model.tag` resolves; published
    entries are exactly the cfgs that carry an hf_hub_id (timm.list_models(pretrained=True) stays truthful)."""
    for entry in _shipped_index()['entries']:
        assert timm.is_model(entry['model']), entry['model']
        name = f'{entry["model"]}.{entry["tag"]}'
        tags = get_arch_pretrained_cfgs(entry['model'])
        assert name in tags, f'{name} is not a registered pretrained tag ({list(tags)})'
        cfg = tags[name]
        if entry['status'] == 'published':
            assert cfg.hf_hub_id == entry['hf_hub_id']
        else:
            assert not cfg.hf_hub_id


def test_shipped_not_mirrored_entries_refuse_pretrained():
    for entry in _shipped_index()['entries']:
        if entry['status'] == 'not_mirrored':
            with pytest.raises(hub.PretrainedUnavailableError, match=re.escape(entry['source']['url'])):
                timm.create_model(f'{entry["model"]}.{entry["tag"]}', pretrained=True, device='meta')


@pytest.mark.parametrize('entry', [GOOD_PUBLISHED, GOOD_NOT_MIRRORED, GOOD_TRAINED, GOOD_LOCAL],
                         ids=['published', 'not_mirrored', 'trained', 'local'])
def test_validator_accepts_schema_examples(entry):
    validate_entry(entry)


def _mutate(entry, path, value):
    e = copy.deepcopy(entry)
    target = e
    *parents, last = path
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return e


BAD = [
    (GOOD_PUBLISHED, ('sha256',), KeyError, 'sha256'),
    (GOOD_PUBLISHED, ('sha256',), 'XYZ', 'sha256'),
    (GOOD_PUBLISHED, ('size',), 0, 'size'),
    (GOOD_PUBLISHED, ('size',), True, 'size'),
    (GOOD_PUBLISHED, ('hf_hub_id',), 'no-org', 'hf_hub_id'),
    (GOOD_PUBLISHED, ('filename',), 'model.pth', 'filename'),
    (GOOD_PUBLISHED, ('status',), 'maybe', 'status'),
    (GOOD_PUBLISHED, ('model',), 'no_such_model_xyz', 'not a registered'),
    (GOOD_PUBLISHED, ('license',), '', 'license'),
    (GOOD_PUBLISHED, ('dataset',), KeyError, 'dataset'),
    (GOOD_PUBLISHED, ('source', 'type'), 'authors_release', 'file of ours'),
    (GOOD_PUBLISHED, ('source', 'url'), 'http://insecure.example', 'https'),
    (GOOD_PUBLISHED, ('metrics', 0, 'protocol'), '', 'protocol'),
    (GOOD_PUBLISHED, ('metrics', 0, 'value'), '73.2', 'value'),
    (GOOD_PUBLISHED, ('metrics', 0, 'measured_by'), 'someone', 'measured_by'),
    (GOOD_NOT_MIRRORED, ('source', 'type'), 'converted', 'authors_release'),
    (GOOD_NOT_MIRRORED, ('metrics',), [{'name': 'top1', 'value': 1.0, 'protocol': 'p', 'measured_by': 'dynzoo'}],
     'measured by dynzoo'),
    (GOOD_TRAINED, ('source', 'recipe'), KeyError, 'recipe'),
    (GOOD_LOCAL, ('file',), 'relative/path.safetensors', 'absolute path'),
    (GOOD_LOCAL, ('hf_hub_id',), 'dynzoo/attnet_xxs.digits', 'not both'),
    (GOOD_LOCAL, ('source', 'from'), KeyError, 'source.from'),
    (GOOD_LOCAL, ('pretrained_cfg',), {'num_classes': 10, 'hf_hub_id': 'x/y'}, 'pretrained_cfg'),
]


@pytest.mark.parametrize('entry,path,value,message', BAD, ids=[f'{b[0]["status"]}-{".".join(map(str, b[1]))}-{i}'
                                                               for i, b in enumerate(BAD)])
def test_validator_refuses_bad_entries(entry, path, value, message):
    with pytest.raises(IndexValidationError, match=message):
        validate_entry(_mutate(entry, path, value))


def test_index_refuses_duplicates_and_wrong_schema():
    with pytest.raises(IndexValidationError, match='duplicate'):
        validate_index({'schema': hub.INDEX_SCHEMA, 'entries': [GOOD_PUBLISHED, GOOD_PUBLISHED]})
    with pytest.raises(IndexValidationError, match='schema'):
        validate_index({'schema': 'other/1', 'entries': []})


def test_update_index_read_modify_write(tmp_path):
    path = tmp_path / 'index.json'
    update_index(path, GOOD_NOT_MIRRORED)
    update_index(path, GOOD_PUBLISHED)
    replaced = dict(GOOD_PUBLISHED, sha256='ef' * 32)
    index = update_index(path, replaced)
    assert [(e['model'], e['tag']) for e in index['entries']] == [('attnet_t1', 'in1k'), ('fmdconv_resnet18', 'in1k')]
    on_disk = json.loads(path.read_text())
    assert on_disk == index and on_disk['entries'][1]['sha256'] == 'ef' * 32
    with pytest.raises(IndexValidationError):
        update_index(path, dict(GOOD_PUBLISHED, sha256='bad'))
    assert json.loads(path.read_text()) == index  # a refused entry leaves the file untouched


def test_docs_describe_every_schema_field():
    """docs/weights.md documents the fields the validator enforces."""
    text = DOCS.read_text()
    fields = ['model', 'tag', 'status', 'hf_hub_id', 'filename', 'revision', 'sha256', 'size', 'source', 'dataset',
              'metrics', 'license', 'published', 'not_mirrored', 'trained', 'converted', 'authors_release',
              'recipe', 'protocol', 'measured_by', 'url', 'repo', 'commit', 'file', 'added', 'from',
              'pretrained_cfg', 'DYNZOO_WEIGHTS_INDEX', 'XDG_CACHE_HOME', 'hub_pins.json']
    missing = [f for f in fields if f'`{f}`' not in text]
    assert not missing, f'docs/weights.md does not document {missing}'


# --- the index in force: cached on its content; timm's .untrained tag ------------------------------------------

def test_index_cache_follows_content_not_mtime(tmp_path, monkeypatch):
    """A rewrite that keeps size and modification time (a copy with preserved times, a coarse clock) is seen."""
    path = tmp_path / 'index.json'
    monkeypatch.setenv(hub.INDEX_ENV, str(path))
    first, second = dict(GOOD_NOT_MIRRORED, tag='in1k'), dict(GOOD_NOT_MIRRORED, tag='in2k')
    path.write_text(json.dumps({'schema': hub.INDEX_SCHEMA, 'entries': [first]}))
    stamp = path.stat().st_mtime_ns
    assert hub.find_entry('attnet_t1', 'in1k') == first
    path.write_text(json.dumps({'schema': hub.INDEX_SCHEMA, 'entries': [second]}))
    os.utime(path, ns=(stamp, stamp))
    assert path.stat().st_mtime_ns == stamp and hub.find_entry('attnet_t1', 'in1k') is None
    assert hub.find_entry('attnet_t1', 'in2k') == second


@pytest.mark.parametrize('make, match', [
    (lambda p: p.write_text('{"schema": '), r'is not valid JSON \(Expecting value: line 1'),
    (lambda p: p.mkdir(), 'is a directory'),
], ids=['bad_json', 'directory'])
def test_unreadable_index(tmp_path, monkeypatch, make, match):
    path = tmp_path / 'index.json'
    make(path)
    monkeypatch.setenv(hub.INDEX_ENV, str(path))
    with pytest.raises(hub.CheckpointError, match=f'weights index {re.escape(str(path))} {match}'):
        hub.load_index()


def test_untrained_exactly_where_no_weights_exist():
    """timm's convention: a model is tagged ``.untrained`` and nothing else exactly when no weights exist for it:
    the shipped index lists no checkpoint of it and it has no static source to be upcycled from."""
    from dynzoo.models._builder import upcycle_sources
    listed = {e['model'] for e in _shipped_index()['entries']}
    wrong = {name: known_tags(name) for name in dynzoo.list_dynzoo_models()
             if (known_tags(name) == [hub.UNTRAINED_TAG]) == (name in listed or bool(upcycle_sources(name)))}
    assert not wrong, f'tags do not follow the weights (.untrained alone iff none): {wrong}'


def test_user_index_is_layered_over_the_base(tmp_path, monkeypatch):
    """``$DYNZOO_WEIGHTS_INDEX`` replaces the packaged index; the user's index (``$XDG_CACHE_HOME/dynzoo/
    weights_index.json``) is layered over either, its entry winning for the same model.tag."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    assert hub.user_index_path() == tmp_path / 'cache' / 'dynzoo' / 'weights_index.json'
    assert [p for p, _ in hub.index_layers()] == [hub.index_path()]  # no user index yet
    assert hub.find_entry('attnet_t1', 'in1k')['status'] == 'not_mirrored'  # the packaged index
    mine = dict(GOOD_LOCAL, model='attnet_t1', tag='in1k')
    update_index(hub.user_index_path(), mine)
    update_index(hub.user_index_path(), GOOD_LOCAL)
    assert hub.find_entry('attnet_t1', 'in1k') == mine and hub.find_entry('attnet_xxs', 'digits') == GOOD_LOCAL
    assert hub.find_entry('attnet_t2', 'in1k')['status'] == 'not_mirrored'  # the rest of the base stays
    base = tmp_path / 'base.json'
    base.write_text(json.dumps({'schema': hub.INDEX_SCHEMA, 'entries': [GOOD_PUBLISHED]}))
    monkeypatch.setenv(hub.INDEX_ENV, str(base))
    assert hub.find_entry('attnet_t2', 'in1k') is None  # replaced, not layered
    assert hub.find_entry('fmdconv_resnet18', 'in1k') == GOOD_PUBLISHED and hub.find_entry('attnet_t1', 'in1k') == mine
    assert [p for p, _ in hub.index_layers()] == [base, hub.user_index_path()]


def test_untrained_tag_refuses_pretrained(tmp_path, monkeypatch):
    """``pretrained=True`` on a ``.untrained`` tag raises at once, naming what exists, even where an index entry
    claims to publish it; no download is tried."""
    import huggingface_hub

    def _no_download(*args, **kwargs):
        raise AssertionError('an .untrained tag must not touch the network')

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', _no_download)
    claim = dict(GOOD_PUBLISHED, tag=hub.UNTRAINED_TAG)
    monkeypatch.setenv(hub.INDEX_ENV, str(tmp_path / 'index.json'))
    (tmp_path / 'index.json').write_text(json.dumps({'schema': hub.INDEX_SCHEMA, 'entries': [claim]}))
    assert not hub.is_published(claim['model'], hub.UNTRAINED_TAG)
    with pytest.raises(hub.PretrainedUnavailableError,
                       match=re.escape(f"exists for '{claim['model']}.untrained'") + r".*tag for an architecture "
                             r"without released weights"):
        hub.load_checkpoint(dict(architecture=claim['model'], tag=hub.UNTRAINED_TAG))
    monkeypatch.delenv(hub.INDEX_ENV)
    for name in dynzoo.list_dynzoo_models():
        if known_tags(name) == [hub.UNTRAINED_TAG]:
            with pytest.raises(hub.PretrainedUnavailableError, match=re.escape(f"exists for '{name}.untrained'")):
                timm.create_model(name, pretrained=True, device='meta')
