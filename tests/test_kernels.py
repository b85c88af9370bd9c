"""The engine's replacement kernels against ATen's own (zohpc.zo.kernels): exact, any layout."""

import pytest
import torch
import torch.nn.functional as F

from zohpc.zo import kernels as K


@pytest.mark.parametrize("shape,kernel", [((3, 4, 8, 8), (2, 2)), ((3, 4, 7, 9), (2, 2)), ((2, 3, 9, 9), (3, 3)),
                                          ((2, 3, 8, 6), (2, 3)), ((2, 3, 1, 1), (2, 2)), ((2, 3, 5, 4), (1, 2))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_maxpool_strided_equals_max_pool2d(shape, kernel, channels_last):
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")  # a NaN wins its window, as in ATen
    want = F.max_pool2d(x, kernel, kernel, ceil_mode=True)
    got = K.maxpool_strided(x, kernel)
    assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_chan_conv_equals_conv2d_of_the_changed_input():
    """cached output + conv(delta of one channel block) == conv of the input with that block replaced."""
    torch.manual_seed(0)
    B, C, Q, s = 2, 4, 3, 2
    x = torch.randn(B, C, 7, 6, dtype=torch.float64)
    w = torch.randn(5, C, 3, 2, dtype=torch.float64)
    kw = dict(padding=(1, 2), stride=(2, 1), dilation=(1, 2))
    out = F.conv2d(x, w, **kw)
    blocks = [1, 0, 1]
    new = torch.randn(Q * B, s, 7, 6, dtype=torch.float64)
    index = K.block_index(blocks, s, x.device)
    got, _ = K.chan_conv(x, out, K.chan_delta(x, new, index, s, Q), w, index, kw["padding"], kw["stride"],
                         kw["dilation"], Q, channels_last=False)
    for q, b in enumerate(blocks):
        xq = x.clone()
        xq[:, b * s:(b + 1) * s] = new[q * B:(q + 1) * B]
        assert torch.allclose(got[q * B:(q + 1) * B], F.conv2d(xq, w, **kw), rtol=1e-12, atol=1e-12)
