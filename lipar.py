"""LIPAR: training-free Latent Inter-frame Pruning with Attention Recovery.

LIPAR speeds up video editing with a causal, chunk-by-chunk video DiT
(Self-Forcing on Wan 2.1) by not computing tokens that do not change from one
latent frame to the next.  One boolean mask on the DiT token grid [L, H/16, W/16]
(True = compute the token, False = prune it) drives three stages:

1. Latent inter-frame pruning (Eq. 1, 5-6).  Before sampling, each 2x2 patch of
   the source video's latents is compared with the same patch one latent frame
   earlier; patches that barely change are pruned.  A substitute bound keeps any
   token that has drifted too far from the memory token that would stand in for it.
2. Attention recovery (Eq. 3-4).  The DiT runs on the kept tokens only.  Self-
   attention still sees every position: a pruned token's key/value is the clean
   memory key/value at its location (noise-aware duplication), and attention is
   limited to an M-degree window of frames.
3. Restoration.  A pruned token's output is the memory x0 at its location, so every
   chunk leaves the sampler full size and the VAE decodes a complete video.

Everything here is plain torch and runs on the tensors' own device.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import apply_rope, complete_chunk


# ---- Recipes: the authors' two releases, and ours ----
#
# The paper's numbers come from the authors' first release (DennisMenn/lipar at
# df28874); their later code ("Streaming LIPAR") changed five choices, and this
# project follows the later one plus one guarantee of its own. A recipe names every
# choice at once (README, "Recipes"):
#
#   choice                     paper (df28874)      authors (their head)   ours (default)
#   editing steps              400, 300, 250        400, 350, 250          400, 350, 250
#   restoration                chained              from the memory        from the memory
#   dilation, time window      t-1 .. t+1           t .. t+1               t .. t+1
#   Eq. 5-6 after the cleanup  no                   no                     yes
#   positions past frame 20    absolute             rolled back            rolled back

@dataclass(frozen=True)
class Recipe:
    """steps: the editing steps on Self-Forcing's 1000-step table; chained: a pruned
    latent is restored from the frame before it in its chunk (frame 0 from the memory)
    instead of every frame from the memory; dilation_frames: the dilation's time
    window, 2 (t-1+a .. t+a) or 3 (t-2+a .. t+a) latent frames; bound_after_cleanup:
    Eq. 5-6 once more on the cleaned mask; rolled_positions: past latent frame 20 a
    chunk is placed at frames 18..20 (model.KVCache), else at its absolute index."""
    name: str = "ours"
    steps: tuple = (400, 350, 250)
    chained: bool = False
    dilation_frames: int = 2
    bound_after_cleanup: bool = True
    rolled_positions: bool = True

    def choices(self):
        """Each choice in words, for the summary and the stats."""
        return {"steps": list(self.steps), "restoration": "chained" if self.chained else "from the memory",
                "dilation": "t-1..t+1" if self.dilation_frames == 3 else "t..t+1",
                "bound_after_cleanup": self.bound_after_cleanup,
                "positions": "rolled back past frame 20" if self.rolled_positions else "absolute"}


RECIPES = {"ours": Recipe(),
           "authors": Recipe("authors", bound_after_cleanup=False),
           "paper": Recipe("paper", steps=(400, 300, 250), chained=True, dilation_frames=3,
                           bound_after_cleanup=False, rolled_positions=False)}

# ---- Latent inter-frame pruning (Eq. 1, 5-6) ----
#
# The mask in one picture (t = latent frame, chunks of 3 frames):
#   d_t   = robust L1(P_t, P_{t-1}), t >= 1                     Eq. 1
#   d     = causal Gaussian(median(d))
#   keep  = d > theta, frame 0 always kept
#   keep |= substitute bound against the memory                 Eq. 5-6
#   keep  = cleanup: median, open/close, dilation
#   keep |= substitute bound again, now on the final mask       Eq. 5-6
# The two medians see frames t-2+a .. t+a and the dilation t-1+a .. t+a, where a is
# `lookahead`: 1 is what the authors' code computes (the paper's numbers were
# measured with it), 0 strictly causal windows. Each of the three stages adds its
# look-ahead, so with lookahead=1 the mask of frame t depends on latent frames up to
# t+3: a stream must read three latent frames (12 video frames) ahead. With
# lookahead=0 it never depends on a later frame, at the price of kept regions that
# linger three frames longer after motion stops (tests/test_prune_mask.py).
#
# prune_mask() computes it over a whole clip, stage after stage, as the picture
# reads. MaskStream computes the same mask one latent frame at a time, so that a
# video of any length can be masked as it is read: every filter below takes the
# exact window of frames that one output frame reads, so both compute every frame
# with the same calls, and a clip pushed in pieces gets the very mask it gets whole.


def patchify(latents):
    """[L, C, H, W] latents -> [L, H/2, W/2, 4C]: the values of each DiT token (2x2 patch)."""
    L, C, H, W = latents.shape
    assert H % 2 == 0 and W % 2 == 0, f"latent size {H}x{W} is not a multiple of the 2x2 patch"
    x = latents.reshape(L, C, H // 2, 2, W // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(L, H // 2, W // 2, 4 * C)


def robust_patch_l1(a, b):
    """Eq. 1: robust L1 distance between patches, [..., n] x [..., n] -> [...].

    The mean of |a - b| over its middle order statistics: sorted ranks n//5 up to
    4n//5 - 1 (for n = 64 values: the 13th to the 51st smallest, 39 values), i.e. the
    values between the 20th and 80th percentile.  Trimming both tails measures the
    typical change of the patch, so a few extreme values (VAE noise, one flickering
    channel) can neither force a keep nor hide a real change.
    """
    diff = (a - b).abs().sort(dim=-1).values
    n = diff.shape[-1]
    return diff[..., n // 5:(4 * n) // 5].mean(dim=-1)


def median3(window):
    """3x3x3 median: frames [3, h, w] (the window of one output frame) -> [h, w].

    Pixels outside the frame repeat the nearest one (scipy's mode="nearest"). Which
    three frames form the window, and how the clip's ends are padded, is
    MaskStream's business: t-2+a .. t+a, repeating the first and last frames.
    """
    p = F.pad(window[None], (1, 1, 1, 1), mode="replicate")[0]
    cells = p.unfold(1, 3, 1).unfold(2, 3, 1)  # [3, h, w, 3, 3]
    return cells.permute(1, 2, 0, 3, 4).flatten(2).median(dim=-1).values


def causal_gaussian3(window, sigma=1.5):
    """Causal 3x3x3 Gaussian blur: frames [2, h, w] (t-1 and t) -> frame t [h, w].

    Weights exp(-|o|^2 / (2 sigma^2)) for offsets o in {-1, 0, 1}^3, with the future
    slice (time offset +1) set to zero and the rest renormalised to sum 1: frame t
    mixes frames t-1 and t only.  Edge padding in space, as in median3.
    """
    o = torch.arange(-1, 2, device=window.device, dtype=window.dtype)
    g = torch.exp(-o**2 / (2 * sigma**2))
    k = g[:2, None, None] * g[None, :, None] * g[None, None, :]  # time offsets -1, 0
    p = F.pad(window[None], (1, 1, 1, 1), mode="replicate")
    return F.conv3d(p[None], (k / k.sum())[None, None])[0, 0, 0]


def _dilate3x3(m):
    # max-pool padding never wins a max, so the outside of the frame is ignored
    return F.max_pool2d(m[:, None], 3, stride=1, padding=1)[:, 0]


def _erode3x3(m):
    return -_dilate3x3(-m)


def open_close(mask):
    """Per-frame morphological opening, then closing, with a 3x3 square ([T, h, w] bool).

    Opening drops kept specks thinner than 3 tokens, which would cost attention
    work for little gain; closing fills pruned pinholes and 1-token gaps inside
    kept regions, which would otherwise be patched with stale memory.  Outside the
    frame counts as neither kept nor pruned (OpenCV's default border does the same):
    the border does not erode a region, and a 1-token strip between a region and
    the border is closed like any other gap.
    """
    m = mask.float()
    m = _dilate3x3(_erode3x3(m))
    m = _erode3x3(_dilate3x3(m))
    return m > 0.5


def dilate(window):
    """Dilation over 5x5 tokens and the frames of its window: bool [n, h, w] -> [h, w].

    A token is kept when any token within 2 rows and columns is kept in any frame of
    its window, t-1+a .. t+a (n = 2): kept regions get a 2-token safety margin, and
    either start one frame early (a = 1, the authors' later code: their (3, 5, 5) box
    with its last time slice zeroed, which in scipy's convention drops the past
    frame) or persist one frame after motion stops (a = 0). Their first release
    (Recipe "paper") keeps the whole box, t-1 .. t+1 (n = 3, a = 1). Frames outside
    the clip are empty.
    """
    either = window.any(dim=0).float()
    return F.max_pool2d(either[None, None], 5, stride=1, padding=2)[0, 0] > 0.5


class SubstituteBound:
    """Eq. 5-6, one frame at a time: also keep every token too far from its substitute.

    A token pruned in chunk c is replaced by the memory at its location: what the KV
    cache holds there at the last frame of chunk c-1.  For a pruned token the cache
    holds a copy of the same location one frame earlier (the memory step chains
    copies frame to frame), so the memory is the latent of the *last kept* frame at
    that location up to the end of chunk c-1.  Eq. 1 only bounds neighbouring
    frames, so slow drift could pile up without limit; comparing with the memory
    bounds the error of the substitution itself: every pruned token of chunks >= 1
    ends within robust L1 theta2 of its memory.

    Chunk 0 has no memory (its pruned tokens are simply absent from attention), so
    it is not checked; the first memory is the last kept value among its frames.
    """

    def __init__(self, theta2, chunk_frames=3):
        self.theta2, self.chunk_frames = theta2, chunk_frames
        self.latest = self.memory = None  # last kept value per location: now, and as of the chunk's start

    def __call__(self, t, patches, keep):
        """Frame t's patches [h, w, n] and keep [h, w] -> keep with the bound's tokens added.
        Frames come in order, t = 0, 1, 2, ..."""
        if t == 0:
            self.latest = patches
        if t % self.chunk_frames == 0:
            self.memory = self.latest
        if t >= self.chunk_frames:
            keep = keep | (robust_patch_l1(patches, self.memory) > self.theta2)
        self.latest = torch.where(keep[..., None], patches, self.latest)
        return keep


class Frames:
    """Frames t = first, first + 1, ... of one stage of MaskStream, held only while a
    later stage may still read them; `end` is one past the last frame once the video
    has ended (None before)."""

    def __init__(self, first=0):
        self.first = self.next = first
        self.end = None
        self.held = {}

    def add(self, frame):
        self.held[self.next] = frame
        self.next += 1

    def close_after(self, source):
        """The stage has ended once the stage it reads has, and every frame is done."""
        if source.end is not None and self.next == source.end:
            self.end = source.end

    def drop_before(self, t):
        for old in [i for i in self.held if i < t]:
            del self.held[old]

    def window(self, lo, hi, pad="edge", first=None):
        """Frames lo .. hi-1 stacked, or None while some are still to come. Outside
        [first, end) a frame repeats the nearest one (pad="edge") or is zero ("zero");
        `first` can start the range later than the stage does."""
        if hi > self.next and self.end is None:
            return None
        first, last = first or self.first, self.next - 1
        frames = []
        for t in range(lo, hi):
            if first <= t <= last:
                frames.append(self.held[t])
            elif pad == "edge":
                frames.append(self.held[min(max(t, first), last)])
            else:
                frames.append(torch.zeros_like(self.held[last]))
        return torch.stack(frames)


class MaskStream:
    """The token keep-mask [L, H/16, W/16] (bool, True = compute) of normalised latents
    [L, 16, H/8, W/8], computed as the latent frames arrive.

    push(latents) takes the next latent frames and returns the mask frames that are
    now final (with lookahead=1 a frame is final three latent frames later); finish()
    says the video has ended and returns the rest.  Memory stays that of a few frames.

    theta: threshold on the smoothed frame-to-frame distance (Eq. 1; paper 0.15).
    theta2: substitute bound (Eq. 5-6); float('inf') turns it off.
    chunk_frames: latent frames per sampler chunk; the memory advances once per chunk.
    lookahead: how far the medians and the dilation see ahead in time, 1 (the
    authors') or 0 (strictly causal); see the picture above.
    dilation_frames, bound_after_cleanup: as a Recipe says.
    """

    def __init__(self, theta=0.149, theta2=0.3, chunk_frames=3, lookahead=1, dilation_frames=2,
                 bound_after_cleanup=True):
        self.theta, self.lookahead = theta, lookahead
        self.dilation_frames, self.bound_after_cleanup = dilation_frames, bound_after_cleanup
        self.patches = Frames()
        self.distance = Frames(first=1)  # Eq. 1, for frames 1..L-1
        self.median = Frames(first=1)
        self.bounded = Frames()          # d > theta, then the first substitute bound
        self.cleaned = Frames(first=1)   # the cleanup's median and open/close
        self.final = Frames()
        self.first_bound = SubstituteBound(theta2, chunk_frames)
        self.final_bound = SubstituteBound(theta2, chunk_frames)
        self.grid = (0, 0)

    def push(self, latents):
        """latents [F, 16, H/8, W/8] (F >= 0): the next frames. Returns the newly final mask frames [F', h, w]."""
        done = self.final.next
        self.grid = latents.shape[2] // 2, latents.shape[3] // 2
        for patches in patchify(latents.float()):
            self.patches.add(patches)
            self._advance()
        return self._emit(done)

    def finish(self):
        """The video has ended: the mask frames not returned yet, [F', h, w]."""
        done = self.final.next
        self.patches.end = self.patches.next
        self._advance()
        return self._emit(done)

    def _emit(self, done):
        frames = [self.final.held[t] for t in range(done, self.final.next)]
        # every stage still reads at most three frames back (a median's window at a = 0)
        for series in (self.patches, self.distance, self.median, self.bounded, self.cleaned, self.final):
            series.drop_before(self.final.next - 3)
        if frames:
            return torch.stack(frames)
        return torch.zeros(0, *self.grid, dtype=torch.bool)

    def _advance(self):
        """Compute every frame of every stage whose window is now known, in order."""
        a = self.lookahead
        P, d, m, k, c, f = self.patches, self.distance, self.median, self.bounded, self.cleaned, self.final
        while d.next < P.next:  # Eq. 1 against the previous frame
            d.add(robust_patch_l1(P.held[d.next], P.held[d.next - 1]))
        d.close_after(P)
        while m.next < d.next and (w := d.window(m.next - 2 + a, m.next + a + 1)) is not None:
            m.add(median3(w))
        m.close_after(d)
        while k.next < P.next:
            t = k.next
            if t == 0:  # frame 0 is always computed
                keep = torch.ones_like(P.held[0][..., 0], dtype=torch.bool)
            elif (w := m.window(t - 1, t + 1)) is not None:
                keep = causal_gaussian3(w) > self.theta
            else:
                break
            k.add(self.first_bound(t, P.held[t], keep))
        k.close_after(P)
        # The cleanup reads frames >= 1 only: frame 0 is kept by fiat, not by motion,
        # and would otherwise vote frames 1-2 kept in the median and dilation.
        while c.next < k.next and (w := k.window(c.next - 2 + a, c.next + a + 1, first=1)) is not None:
            c.add(open_close((median3(w.float()) > 0.5)[None])[0])
        c.close_after(k)
        while f.next < P.next:
            t = f.next
            if t == 0:
                keep = k.held[0]
            elif (w := c.window(t - self.dilation_frames + 1 + a, t + a + 1, pad="zero")) is not None:
                keep = dilate(w)
            else:
                break
            # The cleanup can drop tokens the first bound kept (median, opening) and keeps
            # extra ones, which moves the memory of later chunks; walking the chunks again
            # on the cleaned mask restores the guarantee and only adds the tokens it needs.
            f.add(self.final_bound(t, P.held[t], keep) if self.bound_after_cleanup else keep)


def over_frames(series, op, past, ahead, pad="edge"):
    """op applied to the window of frames t-past .. t+ahead of every frame t of a whole
    series [T, ...] -> [T, ...]. Outside the series a frame repeats the nearest one
    (pad="edge") or is zero (pad="zero"): the windows MaskStream reads frame by frame."""
    if len(series) == 0:
        return series
    T = len(series)
    if pad == "edge":
        before, after = series[:1].expand(past, *series.shape[1:]), series[-1:].expand(ahead, *series.shape[1:])
    else:
        before, after = series.new_zeros(past, *series.shape[1:]), series.new_zeros(ahead, *series.shape[1:])
    padded = torch.cat([before, series, after])
    return torch.stack([op(padded[t:t + past + ahead + 1]) for t in range(T)])


def substitute_bound(patches, keep, theta2, chunk_frames=3):
    """Eq. 5-6 over a whole clip: patches [L, h, w, n], keep [L, h, w] -> keep with every
    token too far from its substitute added (SubstituteBound, walked frame by frame)."""
    bound = SubstituteBound(theta2, chunk_frames)
    return torch.stack([bound(t, patches[t], keep[t]) for t in range(len(keep))])


def prune_mask(latents, theta=0.149, theta2=0.3, chunk_frames=3, lookahead=1, dilation_frames=2,
               bound_after_cleanup=True):
    """Token keep-mask [L, H/16, W/16] (bool, True = compute) for a whole clip's
    normalised latents [L, 16, H/8, W/8]: the paper's sequence of operations, one
    stage after the other over the whole clip (the picture at the top of this section).
    MaskStream computes the same mask frame by frame as a stream is read (the tests
    hold the two bit-equal); see it for the arguments."""
    a = lookahead
    patches = patchify(latents.float())                                  # [L, h, w, 64] per DiT token
    d = robust_patch_l1(patches[1:], patches[:-1])                       # Eq. 1, frames 1..L-1
    d = over_frames(d, median3, past=2 - a, ahead=a)                     # 3x3x3 median
    d = over_frames(d, causal_gaussian3, past=1, ahead=0)                # causal 3x3x3 Gaussian, sigma 1.5
    first = torch.ones_like(patches[:1, ..., 0], dtype=torch.bool)     # frame 0 is always computed
    keep = torch.cat([first, d > theta])                                 # threshold theta
    keep = substitute_bound(patches, keep, theta2, chunk_frames)         # Eq. 5-6
    # cleanup, on frames >= 1 only (frame 0 is kept by fiat, not by motion)
    cleaned = over_frames(keep[1:].float(), median3, past=2 - a, ahead=a) > 0.5  # median
    cleaned = open_close(cleaned)                                        # opening, then closing
    cleaned = over_frames(cleaned, dilate, past=dilation_frames - 1 - a, ahead=a, pad="zero")  # (2 or 3, 5, 5)
    keep = torch.cat([keep[:1], cleaned])
    if not bound_after_cleanup:
        return keep
    return substitute_bound(patches, keep, theta2, chunk_frames)         # Eq. 5-6 again, on the final mask


def prune_ratio(keep):
    """Fraction of pruned tokens in latent frames 1..L-1 (frame 0 is never pruned)."""
    return (~keep[1:]).float().mean().item()


def chunk_prune_ratios(keep, chunk_frames=3):
    """Fraction of pruned tokens in each chunk of chunk_frames latent frames (chunk 0 includes frame 0)."""
    pruned = (~keep).float()
    return [pruned[s:s + chunk_frames].mean().item() for s in range(0, keep.shape[0], chunk_frames)]


# ---- Attention recovery (Eq. 3-4) ----
#
# Only self-attention mixes tokens, so only it needs the pruned tokens: the
# norms, FFN and cross-attention of a kept token never look at another token.
# Every layer therefore runs on the kept tokens alone, and each layer's
# self-attention is handed a complete chunk of keys/values in which every pruned
# token's entry is a copy of a clean one (noise-aware duplication), rotated by
# RoPE to the pruned token's own (frame, row, col). When the copy is exact, the
# softmax sums over the pruned sequence equal those over the full one (Eq. 3);
# the M-degree window then keeps only the dominant terms of those sums: the first
# m_sink frames and the last m_recent ones (Eq. 4; the KVCache in model.py holds
# exactly that window).
#
# A RecoveryPlan says, for one chunk and one ablation mode, where each token's
# key/value comes from. Rows 0..N-1 of the source are the memory (the clean,
# pre-RoPE keys/values of the previous chunk's last frame, one row per location);
# rows N.. are the kept tokens computed now. A plan is a pure function of the
# chunk's mask, so it is built once per chunk, before the denoising loop.

MODES = ("full", "naive", "noisy_dup", "lipar")


class RecoveryPlan:
    """Where the keys/values of one chunk's tokens come from.

    kept [n_kept]: flat indices (frame-major raster order) of the computed tokens.
    For the denoising steps and for the memory step separately:
    src [F·N]: for every token of the chunk, its row in cat(memory, kept);
    valid [F·N] or None: which of those keys exist (None: all of them).
    """

    def __init__(self, kept, denoise_src, denoise_valid, memory_src, memory_valid):
        self.kept = kept
        self.sources = {False: (denoise_src, denoise_valid), True: (memory_src, memory_valid)}

    def recover(self, memory_k, memory_v, k_kept, v_kept, memory_step):
        """Complete the chunk's pre-RoPE keys and values [B, F·N, H, Dh] (Eq. 3)."""
        src = self.source(memory_step)
        return complete_chunk(memory_k, k_kept, src), complete_chunk(memory_v, v_kept, src)

    def source(self, memory_step):
        return self.sources[memory_step][0]

    def key_valid(self, memory_step):
        return self.sources[memory_step][1]


def recovery_plan(keep, mode="lipar", has_memory=True):
    """The RecoveryPlan of one chunk from its mask keep [F, h, w] (True = computed).

    lipar      denoising steps: a pruned token copies the memory at its location,
               clean keys for a noisy chunk (noise-aware duplication). In the first
               chunk there is no memory yet and pruned keys are simply absent.
    noisy_dup  denoising steps: a pruned token copies the same location one frame
               earlier in the current, noisy pass (the first frame: the memory):
               the ablation whose copied noise breaks the i.i.d. assumption.
    both       memory step (t = 0, everything clean): copies chain frame to frame,
               from the same location one frame earlier (the first frame: memory).
    naive      pruned keys are dropped, in every step.
    """
    if mode not in MODES[1:]:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of {MODES[1:]}")
    frames, h, w = keep.shape
    n = h * w
    flat = keep.flatten()
    kept = flat.nonzero().squeeze(1)
    own = n + flat.long().cumsum(0) - 1  # a kept token's row in cat(memory, kept)
    location = torch.arange(frames * n, device=keep.device) % n
    memory_row = torch.where(flat, own, location)
    # the latest kept frame at or before each token, same location (-1: none in this chunk)
    frame_ids = torch.arange(frames, device=keep.device)[:, None, None]
    last_kept = torch.where(keep, frame_ids, -1).cummax(dim=0).values.flatten()
    chained_row = torch.where(last_kept >= 0, own[(last_kept.clamp(min=0) * n + location)], location)

    def valid(src):
        """Without a memory (first chunk) the rows 0..N-1 do not exist yet."""
        present = flat if mode == "naive" else (src >= n) | has_memory
        return None if bool(present.all()) else present

    if mode == "naive":
        denoise_src = memory_src = memory_row
    else:
        memory_src = chained_row
        denoise_src = memory_row if mode == "lipar" else chained_row
    if not kept.numel():  # nothing kept: every step copies the memory alike, one source (KVCache writes it once)
        memory_src = denoise_src
    return RecoveryPlan(kept, denoise_src, valid(denoise_src), memory_src, valid(memory_src))


def chunk_plans(keep, mode, frames_per_chunk=3):
    """One RecoveryPlan per chunk of the video mask keep [L, h, w] (None for mode "full")."""
    if mode == "full":
        return [None] * (keep.shape[0] // frames_per_chunk)
    return [recovery_plan(keep[s:s + frames_per_chunk], mode, has_memory=s > 0)
            for s in range(0, keep.shape[0], frames_per_chunk)]


def recovered_attention(q, k_kept, v_kept, plan, memory_k, memory_v, past_k, past_v, rope_q, rope_chunk,
                        memory_step=False):
    """LIPAR self-attention of one chunk's kept queries, as plain softmax math (Eq. 3-4).

    The readable reference for what the model computes with SDPA and its KV cache.
    q, k_kept, v_kept [B, n_kept, H, Dh]: this chunk's kept tokens, before RoPE.
    memory_k/v [B, N, H, Dh]: the previous chunk's clean last frame, before RoPE.
    past_k/v [B, P, H, Dh]: the cached keys (after RoPE) / values of the earlier
    frames inside the M-degree window: the first m_sink frames and the most recent
    ones (Eq. 4); frames outside it are not passed at all.
    rope_q / rope_chunk: (cos, sin) of the kept tokens' and of all the chunk's positions.
    Computes in float64 when given float64, else float32.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    # Eq. 3: complete the chunk with duplicated clean keys/values, each key rotated
    # to the position of the token it stands in for
    k_chunk, v_chunk = plan.recover(memory_k, memory_v, k_kept, v_kept, memory_step)
    keys = torch.cat([past_k, apply_rope(k_chunk, rope_chunk)], dim=1).to(dtype)
    values = torch.cat([past_v, v_chunk], dim=1).to(dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", apply_rope(q, rope_q).to(dtype), keys) / q.shape[-1] ** 0.5
    valid = plan.key_valid(memory_step)
    if valid is not None:  # keys that do not exist (naive pruning; the first chunk)
        present = torch.cat([valid.new_ones(past_k.shape[1]), valid])
        scores = scores.masked_fill(~present, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return torch.einsum("bhqk,bkhd->bqhd", weights / weights.sum(dim=-1, keepdim=True), values)


# ---- Restoration ----


def restore(x0, keep, memory_x0, chained=False):
    """Full-size x0 of a chunk: computed where kept, a substitute where pruned.

    x0 [B, C, F, H, W] (pruned positions hold no prediction); keep [F, H/2, W/2];
    memory_x0 [B, C, H, W]: the previous chunk's last frame of x0 (in the first
    chunk: the chunk's own frame 0, which is always kept). The substitute is the
    memory in every frame, or with `chained` (the paper's release) the restored frame
    before it: frame 0 from the memory, frame i from frame i-1.
    """
    keep_pixels = keep.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # token grid → latent grid
    if not chained:
        return torch.where(keep_pixels[None, None], x0, memory_x0[:, :, None])
    frames, previous = [], memory_x0
    for f in range(x0.shape[2]):
        previous = torch.where(keep_pixels[f], x0[:, :, f], previous)
        frames.append(previous)
    return torch.stack(frames, dim=2)
