"""How close one edit is to another: PSNR and SSIM of the decoded frames and the
relative error of the edited latents, accumulated chunk by chunk as a stream goes.

The paper reports its modes' fidelity to the unpruned Self-Forcing edit (`full`); so
do we: `Fidelity` compares every mode of a run with `full`, and a sweep's later runs
of the same clip with the `full` chunks it recorded.
"""

import math

import torch
import torch.nn.functional as F


def psnr(mse, peak=255.0):
    """Peak signal-to-noise ratio in dB from a mean squared error (inf when identical)."""
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def gaussian_window(size=11, sigma=1.5):
    """The normalised 1D Gaussian of SSIM (Wang et al. 2004): 11 taps, σ = 1.5."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(a, b, peak=255.0):
    """Mean SSIM of each frame pair, [T]: frames [T, H, W, C] (uint8 or float in 0..peak).

    Wang et al. (2004): local means, variances and covariance under an 11×11 Gaussian
    window (σ = 1.5), C1 = (0.01 peak)², C2 = (0.03 peak)², averaged over every window
    that fits inside the frame (no padding) and over the channels. Computed in float32
    on the frames' device, from values centred on peak / 2 (the variances then lose
    ~1e-4 to cancellation, far below C2 = 58.5); the tests check it against a float64
    loop over windows.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim needs frames of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = (f.permute(0, 3, 1, 2).float() for f in (a, b))  # [T, C, H, W]
    channels = x.shape[1]
    g = gaussian_window().to(x.device, torch.float32)
    rows, cols = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(z):  # the separable 2D Gaussian, per channel, valid positions only
        return F.conv2d(F.conv2d(z, rows, groups=channels), cols, groups=channels)

    x, y = x - peak / 2, y - peak / 2  # moments of centred values lose less to float32 cancellation
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    mu_x, mu_y = mu_x + peak / 2, mu_y + peak / 2
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean(dim=(1, 2, 3))


class Fidelity:
    """Each mode's distance to `full`, chunk by chunk, holding nothing of a long clip:
    PSNR over all frames (from the mean squared error), mean SSIM per frame, and the
    relative L2 error ‖x0 − x0_full‖ / ‖x0_full‖ of the edited latents.

    reference: None, or a list. When a chunk's modes include `full`, the others are
    compared with it, and its latents and frames are appended to the list (on the
    CPU) when one is given; when they do not, chunk i is compared with the list's
    entry i, recorded by an earlier run of the same clip (a sweep over θ and m).
    """

    def __init__(self, reference=None):
        self.reference, self.chunk = reference, 0
        self.sums = {}  # mode -> [frames, squared pixel error, SSIM, squared latent error, squared latent norm]

    def add(self, latents, frames):
        """latents {mode: x0 [1, C, F, h, w]}, frames {mode: uint8 [n, H, W, 3]} of one chunk."""
        if "full" in latents:
            ref_latents, ref_frames = latents["full"], frames["full"]
            if self.reference is not None:
                self.reference.append((ref_latents.cpu(), ref_frames.cpu()))
        elif self.reference is not None and self.chunk < len(self.reference):
            ref_latents, ref_frames = self.reference[self.chunk]
        else:
            raise ValueError("Fidelity has no `full` edit of this chunk to compare with")
        for mode in latents:
            if mode == "full":
                continue
            device = latents[mode].device  # the GPU when there is one: SSIM of 480x832 frames is convolutions
            x, x_ref = latents[mode].double(), ref_latents.to(device).double()
            f, f_ref = frames[mode].to(device), ref_frames.to(device)
            sums = self.sums.setdefault(mode, [0, 0.0, 0.0, 0.0, 0.0])
            sums[0] += len(f)
            sums[1] += (f.double() - f_ref.double()).pow(2).mean(dim=(1, 2, 3)).sum().item()
            sums[2] += ssim(f, f_ref).double().sum().item()
            sums[3] += (x - x_ref).pow(2).sum().item()
            sums[4] += x_ref.pow(2).sum().item()
        self.chunk += 1

    def stats(self):
        """{mode: {"psnr_db", "ssim", "latent_rel_error"}} for every mode compared."""
        return {mode: {"psnr_db": psnr(err / n), "ssim": s / n,
                       "latent_rel_error": math.sqrt(lat_err / lat_norm) if lat_norm else 0.0}
                for mode, (n, err, s, lat_err, lat_norm) in self.sums.items()}
