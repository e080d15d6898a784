"""ovseg.any_vocab: one loaded CLIP names masks from any vocabulary a visitor types (the demo's naming)."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from conftest import TINY
from emerdiff import load_config
from emerdiff.segmentor import SegmentationOutput
from ovseg.any_vocab import AnyVocabulary
from ovseg.config import ovseg_settings


def test_any_vocabulary_takes_names_or_shipped_vocabularies_never_a_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password\nhunter2\n")
    naming = AnyVocabulary(ovseg_settings(load_config(TINY)), tmp_path)
    labels = torch.zeros(32, 32, dtype=torch.long)
    labels[:, 16:] = 1
    masks = torch.stack([labels[::4, ::4] == 0, labels[::4, ::4] == 1])
    output = SegmentationOutput(labels=labels, labels_bilinear=labels, lowres_labels=labels[::4, ::4],
                                lowres_masks=masks, mask_embeddings=torch.zeros(2, 8), seed=0)
    photo = np.array(Image.fromarray(data.coffee()).resize((32, 32)))
    image = torch.from_numpy(photo).permute(2, 0, 1)

    named = naming(" cat,  dog ")(image, output)
    assert named.class_names == ["cat", "dog"] and set(named.masks.class_ids.tolist()) <= {0, 1}
    assert naming("cat,dog") is naming(" cat,  dog ")  # one namer per vocabulary, kept
    assert len(naming("voc")(image, output).class_names) > 2  # a shipped vocabulary by its name
    assert naming(str(secret))(image, output).class_names == [str(secret)]  # a name, the file is not read
    with pytest.raises(ValueError, match="duplicate"):
        naming("cat, cat")
    assert (tmp_path / "text_embeddings").is_dir()  # text embeddings cached under the work folder
