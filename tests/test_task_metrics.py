"""Task metrics: IoU / box F1 / PSNR / agreement."""

import math

import torch

from tvm_winoq.task_metrics import agreement, box_f1, iou, psnr_db


def test_iou_and_box_f1():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    ref = [(0, 0, 10, 10), (20, 20, 30, 30)]
    assert box_f1(ref, ref) == 100.0
    assert box_f1(ref, [(0, 0, 10, 10)]) == 100 * 2 * 1.0 * 0.5 / 1.5
    assert box_f1(ref, [(100, 100, 110, 110)]) == 0.0
    assert box_f1([], []) == 100.0


def test_psnr_and_agreement():
    a = torch.tensor([0.0, 1.0, 2.0, 4.0])
    assert math.isinf(psnr_db(a, a))
    assert abs(psnr_db(a, a + 0.04) - 40.0) < 1e-4  # float32 input: 0.04 is not exact
    assert agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 75.0
