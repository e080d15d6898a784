"""ovseg.text's file cache: written through the shared atomic-write helper, so the shared cleanup finds its leftovers."""

import torch

import ovseg.text
from emerdiff.files import TEMP_SUFFIX, remove_temporary_files
from ovseg import TINY_MODEL, cached_text_embeddings, load_clip


def test_a_cache_entry_being_written_is_a_temporary_file_the_shared_cleanup_removes(tmp_path, monkeypatch):
    clip = load_clip(TINY_MODEL, pretrained=None)
    seen = []
    save = torch.save

    def interrupted_save(obj, handle):  # what a kill during the write would leave behind
        save(obj, handle)
        if hasattr(handle, "flush"):
            handle.flush()
        seen.extend(p.name for p in tmp_path.iterdir())
        remove_temporary_files(tmp_path)
        seen.append(sorted(p.name for p in tmp_path.iterdir() if p.is_file()))
        raise KeyboardInterrupt

    monkeypatch.setattr(ovseg.text.torch, "save", interrupted_save)
    args = dict(cache_dir=tmp_path, model_name=TINY_MODEL, pretrained=None)
    try:
        cached_text_embeddings(clip.model, clip.tokenizer, ["cat"], ("a {}.",), **args)
    except KeyboardInterrupt:
        pass
    (during,), after_cleanup = seen[:-1], seen[-1]
    assert during.endswith(TEMP_SUFFIX)  # never a half-written .pt under the entry's own name
    assert after_cleanup == []
    monkeypatch.setattr(ovseg.text.torch, "save", save)
    embeddings = cached_text_embeddings(clip.model, clip.tokenizer, ["cat"], ("a {}.",), **args)
    assert [p.suffix for p in tmp_path.glob("*.pt")] == [".pt"] and embeddings.shape[0] == 1
