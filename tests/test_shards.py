"""Tests of the tar-shard stream: shuffle buffer over several open shards, exact resume, resume on another number of
processes or workers, and the map-style loader's state across ranks."""

from collections import Counter

import pytest

import data
from test_data import batches_equal, make_shards, png_bytes, small_cfg, write_caption_folder, write_tar

SIZES = (4, 3, 5, 2, 4, 3, 4, 5)  # samples per shard; shard 1 also has a caption-less key, shard 2 a corrupt image


def tar_cfg(folder, n_shards, **fields):
    fields = {"batch_size": 3, "ssl_batch_size": 1, "rec_batch_size": 1, "num_local_crops": 1, **fields}
    return small_cfg(dataset="tar", path=str(folder / f"{{00000..{n_shards - 1:05d}}}.tar"), **fields)


def shard_of(caption):
    return int(caption.split()[1])  # "shard {s} sample {k}"


def take_epoch(loader, epoch):
    """Captions of one-sample batches while this rank (one reader) is in `epoch`, up to the first of epoch + 1."""
    out = []
    while loader.state_dict()["epoch"] == epoch:
        out += next(loader)["captions"]
    return out


def test_stored_order_without_a_shuffle_buffer(tmp_path):
    """shuffle_buffer 0, one open shard: each reader reads its shards one after the other, in stored order."""
    make_shards(tmp_path, SIZES)
    shards = data.TarShards(str(tmp_path / "{00000..00007}.tar"))
    groups = shards.reader_groups(0, 0, rank=1, world_size=2, worker=0, num_workers=2)
    assert all(len(g) == 1 for g in groups) and len(groups) == 2
    got = [(shard, k) for _, shard, k, _ in shards.stream(0, groups, seed=0)]
    assert got == [(g[0], k) for g in groups for k in range(SIZES[g[0]] + (g[0] in (1, 2)))]


def test_shuffle_buffer_mixes_open_shards_and_is_deterministic(tmp_path):
    good = make_shards(tmp_path, SIZES)
    cfg = tar_cfg(tmp_path, 8, batch_size=5, shuffle_shards=3, shuffle_buffer=6)
    tok = data.BPETokenizer(300, 16)
    a, b = data.build_pretrain_loader(cfg, tok), data.build_pretrain_loader(cfg, tok)
    batches = [next(a) for _ in range(6)]  # one reader: the whole first epoch (30 samples)
    for batch in batches:
        batches_equal(batch, next(b))  # two constructions give the same stream
    captions = [c for batch in batches for c in batch["captions"]]
    assert sorted(captions) == sorted(good)  # an epoch holds every sample once
    assert all(len({shard_of(c) for c in batch["captions"]}) > 1 for batch in batches)  # every batch mixes shards
    stored = [c for s in dict.fromkeys(shard_of(c) for c in captions) for c in good if shard_of(c) == s]
    assert captions != stored  # not shard after shard in stored order
    cfg.data.seed = 1
    assert next(data.build_pretrain_loader(cfg, tok))["captions"] != batches[0]["captions"]  # another data.seed


def test_shuffled_epochs_cover_every_sample_once_over_2_ranks_x_2_workers(tmp_path):
    good = make_shards(tmp_path, SIZES)
    shards = data.TarShards(str(tmp_path / "{00000..00007}.tar"))
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            for worker in range(2):
                groups = shards.reader_groups(epoch, 0, rank, 2, worker, 2, per_group=2)
                assert len(groups) == 1 and len(groups[0]) == 2  # 8 shards / 4 readers, both open at once
                seen += [s["caption"] for _, _, _, s in shards.stream(epoch, groups, 0, 4) if s is not None]
        assert Counter(seen) == Counter(good)
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order every epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffled_tar_loader_resumes_exactly_mid_group(tmp_path, num_workers):
    make_shards(tmp_path, SIZES)
    cfg = tar_cfg(tmp_path, 8, num_workers=num_workers, shuffle_shards=2, shuffle_buffer=3)
    tok = data.BPETokenizer(300, 16)
    full = data.build_pretrain_loader(cfg, tok)
    reference = [next(full) for _ in range(14)]  # past the end of the first epoch (30 samples) of every reader
    for cut in (4, 7):
        first = data.build_pretrain_loader(cfg, tok)
        for _ in range(cut):
            next(first)
        state = first.state_dict()
        assert any(0 < n for _, _, n in state["readers"]), state  # inside a group: the buffer has to be replayed
        resumed = data.build_pretrain_loader(cfg, tok)
        resumed.load_state_dict(state)
        for k in range(cut, 14):
            batches_equal(next(resumed), reference[k])


def test_each_rank_resumes_its_own_entry_of_the_list(tmp_path):
    make_shards(tmp_path, SIZES)
    cfg = tar_cfg(tmp_path, 8, shuffle_shards=2, shuffle_buffer=2)
    tok = data.BPETokenizer(300, 16)
    loaders = [data.build_pretrain_loader(cfg, tok, rank, 2) for rank in range(2)]
    for loader in loaders:
        next(loader)
    states = [loader.state_dict() for loader in loaders]
    assert states[0]["readers"] != states[1]["readers"]
    for rank in range(2):
        resumed = data.build_pretrain_loader(cfg, tok, rank, 2)
        resumed.load_state_dict(states)
        for _ in range(4):
            batches_equal(next(resumed), next(loaders[rank]))


def clean_shards(folder, n_shards, n_samples):
    """Shards of usable samples only, so that a reader's last sample of an epoch ends it (`take_epoch`)."""
    good = [f"shard {s} sample {k}" for s in range(n_shards) for k in range(n_samples)]
    for s in range(n_shards):
        write_tar(folder / f"{s:05d}.tar", [(f"{s}-{k}", {"png": png_bytes((s * 40, k * 30, 90)),
                                                          "txt": f"shard {s} sample {k}".encode()})
                                            for k in range(n_samples)])
    return good


def one_sample_cfg(folder, **fields):
    return tar_cfg(folder, 6, batch_size=1, **fields)


def check_resumed_epoch(good, old_seen, new_seen):
    """Resumed on another layout: nothing of the epoch lost, nothing read twice in the new part, and no sample of a
    shard that the old run had read in full comes again; repeats come only from partly read shards."""
    by_shard = {s: {c for c in good if shard_of(c) == s} for s in {shard_of(c) for c in good}}
    done = [s for s, caps in by_shard.items() if caps <= set(old_seen)]
    partly = [s for s, caps in by_shard.items() if caps & set(old_seen) and not caps <= set(old_seen)]
    assert done and partly  # the test's cut leaves both kinds
    assert set(old_seen) | set(new_seen) == set(good)
    assert len(new_seen) == len(set(new_seen))
    assert not {shard_of(c) for c in new_seen} & set(done)
    assert {shard_of(c) for c in set(old_seen) & set(new_seen)} <= set(partly)
    assert len(new_seen) < len(good)  # not an epoch restart


def test_tar_resume_on_fewer_and_more_processes(tmp_path, capsys):
    good = clean_shards(tmp_path, 6, 3)
    cfg, tok = one_sample_cfg(tmp_path), data.BPETokenizer(300, 16)

    # 2 processes -> 1: rank 0 had read 1 shard and a part of its second one, rank 1 a part of its first
    old = [data.build_pretrain_loader(cfg, tok, rank, 2) for rank in range(2)]
    old_seen = [c for rank, n in ((0, 4), (1, 2)) for _ in range(n) for c in next(old[rank])["captions"]]
    new = data.build_pretrain_loader(cfg, tok, 0, 1)
    new.load_state_dict([loader.state_dict() for loader in old])
    assert "epoch 0 goes on with the 5 of its 6 shards not fully read" in capsys.readouterr().err
    partial = new.state_dict()["partial"]  # the shards this epoch still reads, kept for a later resume
    assert partial[0] == 0 and len(partial[1]) == 5
    check_resumed_epoch(good, old_seen, take_epoch(new, 0))
    assert new.state_dict()["partial"] is None  # dropped once the epoch is over
    assert Counter(take_epoch(new, 1)) == Counter(good)  # the next epoch is whole again

    # 1 process -> 2: the old rank had read 2 shards and a part of a third; the new ranks share the other 4
    old = data.build_pretrain_loader(cfg, tok, 0, 1)
    old_seen = [c for _ in range(7) for c in next(old)["captions"]]
    state = old.state_dict()
    new = [data.build_pretrain_loader(cfg, tok, rank, 2) for rank in range(2)]
    new[0].load_state_dict([state])
    new[1].load_state_dict(state)  # a bare state of a 1-process run is the whole list
    per_rank = [take_epoch(loader, 0) for loader in new]
    assert all(per_rank)
    check_resumed_epoch(good, old_seen, per_rank[0] + per_rank[1])
    # a new layout's position resumes exactly on that layout
    states = [loader.state_dict() for loader in new]
    again = data.build_pretrain_loader(cfg, tok, 1, 2)
    again.load_state_dict(states)
    for _ in range(3):
        batches_equal(next(again), next(new[1]))


def test_tar_resume_on_more_workers_with_a_shuffle_buffer(tmp_path, capsys):
    good = clean_shards(tmp_path, 6, 3)
    cfg, tok = one_sample_cfg(tmp_path, shuffle_shards=2, shuffle_buffer=2), data.BPETokenizer(300, 16)
    old = data.build_pretrain_loader(cfg, tok)
    old_seen = [c for _ in range(8) for c in next(old)["captions"]]  # the first group (6 samples) and a part of one
    cfg.data.num_workers = 2
    new = data.build_pretrain_loader(cfg, tok)
    new.load_state_dict([old.state_dict()])
    assert "1 process(es) x 1 reader(s), this run has 1 x 2: epoch 0 goes on with the 4 of its 6" in (
        capsys.readouterr().err)
    new_seen = []
    while len(set(old_seen) | set(new_seen)) < len(good):  # the two new readers' batches alternate
        new_seen += next(new)["captions"]
    assert len(new_seen) == 4 * 3 and len(set(new_seen)) == len(new_seen)  # only the 4 shards left, once each


def test_map_style_loader_takes_the_list_of_states_on_any_world_size(tmp_path):
    write_caption_folder(tmp_path, 24)
    cfg = small_cfg(dataset="folder", path=str(tmp_path), batch_size=2, ssl_batch_size=1, rec_batch_size=1)
    tok = data.BPETokenizer(300, 16)
    ranks = [data.build_pretrain_loader(cfg, tok, rank, 2) for rank in range(2)]
    read = [c for loader in ranks for _ in range(2) for c in next(loader)["captions"]]
    states = [loader.state_dict() for loader in ranks]
    for rank in range(2):  # the same world size: exact
        resumed = data.build_pretrain_loader(cfg, tok, rank, 2)
        resumed.load_state_dict(states)
        batches_equal(next(resumed), next(ranks[rank]))
    one = data.build_pretrain_loader(cfg, tok, 0, 1)  # one process: the epoch goes on after the 8 samples read
    one.load_state_dict(states)
    assert one.state_dict() == {"epoch": 0, "offset": 8}
    rest = [c for _ in range(8) for c in next(one)["captions"]]  # 24 samples = 12 batches of 2 per epoch
    assert sorted(read + rest) == sorted(f"caption {i}" for i in range(24))
    assert one.state_dict() == {"epoch": 1, "offset": 0}
