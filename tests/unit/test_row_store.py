"""The on-disk store of relative rows (alignment/row_store.py): a new process reads back the
very rows computed before; a changed member, anchor set or tau never reads them; foreign or
damaged shards are refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from deepen_engine.alignment.relative import RelativeSpace
from deepen_engine.alignment.row_store import FLUSH_ROWS, RowStore, embedding_digest

V, D, A = 40, 6, 10  # tokens 0..9 are the anchors, 10..39 are not


def _space(root, embeddings, tau=5.0, anchor_ids=None, max_rows=1000):
    anchor_ids = torch.arange(A) if anchor_ids is None else anchor_ids
    to_anchor = torch.full((V,), -1, dtype=torch.long)
    to_anchor[anchor_ids] = torch.arange(A)
    store = RowStore.for_space(root, embedding_digest(embeddings), anchor_ids, tau, max_rows)
    return RelativeSpace(embeddings, anchor_ids, to_anchor, tau=tau, store=store)


def _embeddings(seed=0):
    return torch.randn(V, D, generator=torch.Generator().manual_seed(seed))


IDS = [12, 30, 17, 25]


def test_rows_read_back_equal_the_rows_computed(tmp_path):
    first = _space(tmp_path, _embeddings())
    computed = first.non_anchor_rows(IDS)
    first.store.flush()
    again = _space(tmp_path, _embeddings())  # a new process: empty memory cache
    loaded = again.non_anchor_rows(IDS)
    assert torch.equal(loaded, computed)
    assert again.rows_computed == 0 and again.store.loaded == len(IDS)
    assert torch.equal(loaded, again.exact_rows(torch.tensor(IDS)))


@pytest.mark.parametrize(
    "change",
    [
        {"embeddings": _embeddings(1)},  # another member
        {"tau": 7.0},  # another setting
        {"anchor_ids": torch.arange(1, A + 1)},  # another anchor set
    ],
    ids=["member", "tau", "anchors"],
)
def test_a_changed_member_or_setting_never_reads_stale_rows(tmp_path, change):
    old = _space(tmp_path, _embeddings())
    old.non_anchor_rows(IDS)
    old.store.flush()
    kwargs = {"embeddings": _embeddings(), **change}
    new = _space(tmp_path, **kwargs)
    assert new.store.folder != old.store.folder
    rows = new.non_anchor_rows([t for t in IDS if int(new.token_to_anchor[t]) < 0])
    assert new.rows_computed == rows.shape[0] and new.store.loaded == 0
    expected = new.exact_rows(torch.tensor([t for t in IDS if int(new.token_to_anchor[t]) < 0]))
    assert torch.equal(rows, expected)


def test_foreign_and_damaged_shards_are_refused(tmp_path):
    old = _space(tmp_path, _embeddings())
    old.non_anchor_rows(IDS)
    old.store.flush()
    new = _space(tmp_path, _embeddings(2))
    new.store.folder.mkdir(parents=True, exist_ok=True)
    for shard in old.store.folder.glob("rows-*.pt"):  # another member's rows, copied over
        shutil.copy(shard, new.store.folder / shard.name)
    (new.store.folder / "rows-broken.pt").write_bytes(b"not a shard")
    fresh = _space(tmp_path, _embeddings(2))
    assert fresh.store.refused == 2 and len(fresh.store) == 0
    rows = fresh.non_anchor_rows(IDS)
    assert fresh.rows_computed == len(IDS)
    assert torch.equal(rows, fresh.exact_rows(torch.tensor(IDS)))


def test_store_keeps_at_most_max_rows_and_flushes_by_itself(tmp_path):
    space = _space(tmp_path, _embeddings(), max_rows=3)
    space.non_anchor_rows(IDS)
    assert len(space.store) == 3
    space.store.flush()
    assert len(_space(tmp_path, _embeddings(), max_rows=3).store) == 3
    assert FLUSH_ROWS > len(IDS)  # small batches wait in memory until flush or exit


def test_unwritable_folder_warns_and_still_computes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    space = _space(blocker, _embeddings())
    rows = space.non_anchor_rows(IDS)
    with pytest.warns(UserWarning, match="cannot write relative rows"):
        space.store.flush()
    assert torch.equal(rows, space.exact_rows(torch.tensor(IDS)))


def test_ensemble_rows_persist_between_ensembles(tiny_pair, _relative_rows_in_a_temporary_folder):
    """Two ensembles of the same members (two processes): the second reads the first's rows
    and fuses to the very same logits."""
    from deepen_engine import Ensemble, MemberSpec

    def build():
        members = [
            MemberSpec(source=tiny_pair[0], name="a"),
            MemberSpec(source=tiny_pair[1], name="b"),
        ]
        return Ensemble(members, min_anchors=50, tau=37.0)  # a tau no other test uses

    first = build()
    out1 = first.generate("The capital of France is", max_new_tokens=6)
    for space in first.fuser.spaces:
        assert space.rows_computed > 0
        space.store.flush()
    second = build()
    out2 = second.generate("The capital of France is", max_new_tokens=6)
    assert out2.text == out1.text
    assert [s.rows_computed for s in second.fuser.spaces] == [0, 0]
    assert all(s.store.loaded > 0 for s in second.fuser.spaces)
