"""The teacher's logits: taken from a `dupfast.detect` result for the flagged rows (the model runs only on the
few rows that check them), computed once otherwise; either way the same training."""
import torch

import dupfast
import dupfast.purification.api as api
from purify_helpers import batches, tiny_classifier, toy_rows
from dupfast.purification.teacher import CHECK_ROWS

CFG = dict(max_steps=4, min_steps=0, batch_size=16, progress=False, select_best=False, early_stop=False, lr=1e-2)


def _count_teacher_rows(monkeypatch):
    seen = []
    real = api.teacher_logits

    def counting(model, rows, pad_id, device):
        seen.append(len(rows))
        return real(model, rows, pad_id, device)

    monkeypatch.setattr(api, "teacher_logits", counting)
    return seen


def test_a_detection_result_supplies_the_flagged_rows_teacher(monkeypatch):
    import dupfast.purification.teacher as teacher
    pool, _ = toy_rows(96, 1)
    clean, labels = toy_rows(64, 2)
    model = tiny_classifier("llama")
    result = dupfast.detect(model, batches(pool, index=True), clean=batches(clean, labels, index=True))
    result.flags = torch.arange(96) % 2 == 0  # 48 flagged rows

    checked = []
    real_check = teacher.teacher_logits
    monkeypatch.setattr(teacher, "teacher_logits", lambda m, r, p, d: checked.append(len(r)) or real_check(m, r, p, d))
    seen = _count_teacher_rows(monkeypatch)
    reused, report = purify_copy(model, pool, clean, labels, result)
    assert checked == [CHECK_ROWS]                    # the check: a sample of the flagged rows
    assert len(seen) == 1 and seen[0] == report.data["clean_train"]  # then only the clean rows (keep term)
    assert report.teacher_logits["source"] == "detection"
    assert report.teacher_logits["max_abs_diff"] < 1e-6

    seen.clear()
    computed, report2 = purify_copy(model, pool, clean, labels, result.flags[torch.argsort(result.index)])
    assert sum(seen) == 48 + report2.data["clean_train"]  # flagged train + held-out, and the clean rows
    assert report2.teacher_logits == {"source": "computed"}
    assert [h["step"] for h in report.history] == [h["step"] for h in report2.history]
    for k, v in computed.state_dict().items():  # the same training, up to the logits' float32 rounding
        torch.testing.assert_close(reused.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def purify_copy(model, pool, clean, labels, detection):
    import copy
    return dupfast.purify(copy.deepcopy(model), batches(pool, index=True), clean=batches(clean, labels),
                          detection=detection, force=True, **CFG)  # flags set by hand on a clean pool
