"""The BERT text encoder: sub-sentence inputs, the BERT position offset, frozen = eval."""

import torch
from detectron2.config import LazyConfig, instantiate

from grounding_dino.modeling.text_encoder import BertTextEncoder
from grounding_dino.text.masks import sub_sentence_masks


def test_position_offset_changes_only_berts_positions(minilm_dir):
    torch.manual_seed(0)
    plain = BertTextEncoder(minilm_dir, hidden_dim=32).eval()
    shifted = BertTextEncoder(minilm_dir, hidden_dim=32, bert_position_offset=1).eval()
    shifted.feat_map.load_state_dict(plain.feat_map.state_dict())
    captions = ["red circle . blue circle .", "a cat ."]
    with torch.no_grad():
        a, b = plain(captions), shifted(captions)
    masks, positions = sub_sentence_masks(a.input_ids, plain.special_token_ids)
    assert torch.equal(a.position_ids, positions) and torch.equal(b.position_ids, positions)
    assert torch.equal(a.self_attention_mask, masks)

    # The first word of each phrase no longer shares [CLS]'s position: "red" and "blue"
    # (tokens 1 and 4) become much more different.
    def cosine(features):
        return torch.cosine_similarity(features[0, 1], features[0, 4], dim=0).item()

    assert cosine(b.features) < cosine(a.features) - 0.1


def test_a_frozen_text_encoder_stays_in_eval_mode():
    cfg = LazyConfig.load("configs/shapes_tiny.py")
    cfg.model.freeze_text_encoder = True
    model = instantiate(cfg.model).train()
    assert model.training and model.backbone.training
    assert not model.text_encoder.bert.training
    assert not any(p.requires_grad for p in model.text_encoder.bert.parameters())
    assert model.text_encoder.feat_map.weight.requires_grad
