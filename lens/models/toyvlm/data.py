"""Seeded images with known contents for the toy VLM: one coloured shape at one of nine positions.

Each image is ``IMAGE_SIZE`` × ``IMAGE_SIZE`` RGB (96 × 96) on a plain light background, cut by the vision
tower into a ``GRID`` × ``GRID`` patch grid (6 × 6 patches of ``PATCH_SIZE`` = 16 px). The nine positions are
the cells of a 3 × 3 layout; each cell is 32 px = 2 × 2 patches, and the object lies wholly inside its cell,
so it covers at most those four patches. Image token ``k`` of an image (the k-th of its ``GRID**2`` tokens in
the language-model sequence, row-major) covers patch ``(k // GRID, k % GRID)`` = pixels
``[16·row, 16·row + 16) × [16·col, 16·col + 16)``.

Pure numpy + PIL; the same ``seed`` always gives the same images, bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
PATCH_SIZE = 16
GRID = IMAGE_SIZE // PATCH_SIZE  # 6 patches per side, 36 image tokens
CELL = IMAGE_SIZE // 3  # 32 px per position cell

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (135, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
#: position phrase for (row, col) of the 3 × 3 layout
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top center", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom center", (2, 2): "bottom right",
}  # fmt: skip
CAPTION_TEMPLATE = "{article} {colour} {shape} at the {position}."  # article: "an" before a vowel
PROMPT = "Describe the image."

#: Words that count as naming an object's colour or shape (docs/definitions.md#visual-tokens-and-latentlens: automatic interpretability of visual
#: tokens: a visual token is interpretable when a top-5 neighbour is one of these). Compare lower-cased,
#: stripped of the byte-level space marker ("Ġ") and surrounding whitespace/punctuation.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "reds", "crimson", "scarlet", "ruby", "cherry"),
    "green": ("green", "greens", "lime", "emerald", "olive"),
    "blue": ("blue", "blues", "navy", "azure", "cobalt", "sapphire"),
    "yellow": ("yellow", "gold", "golden", "lemon", "amber"),
    "purple": ("purple", "violet", "magenta", "lavender", "plum"),
    "orange": ("orange", "oranges", "amber", "tangerine", "copper"),
    "circle": ("circle", "circles", "circular", "round", "ring", "disk", "disc", "dot", "ball", "oval"),
    "square": ("square", "squares", "box", "block", "rectangle", "rectangular", "cube", "tile"),
    "triangle": ("triangle", "triangles", "triangular", "pyramid", "wedge", "cone"),
    "star": ("star", "stars", "starry", "asterisk", "sparkle", "stellar"),
}

_BACKGROUND_RANGE = (228, 250)  # grey level of the plain background
_COLOUR_JITTER = 18  # ± per channel
_RADIUS_RANGE = (9, 14)  # object half-size in px (inclusive)


@dataclass(frozen=True, eq=False)
class Scene:
    """One generated image and everything known about it.

    Attributes:
        image: ``PIL.Image`` RGB, ``IMAGE_SIZE`` × ``IMAGE_SIZE``.
        colour, shape: attribute names (keys of ``COLOURS`` / members of ``SHAPES``).
        row, col: the object's cell in the 3 × 3 layout (0..2 each).
        position: phrase for (row, col), e.g. ``"top left"``.
        caption: the target text, e.g. ``"a red circle at the top left."``.
        rgb, background: the exact object and background pixel values (uint8 triples).
        mask: ``np.ndarray[bool]`` of shape (H, W): True exactly where the object's pixels are.
        bbox: ``(x0, y0, x1, y1)`` pixel box of the mask, half-open (x1, y1 exclusive).
        coverage: ``np.ndarray[float32]`` of shape (GRID, GRID): fraction of each patch's pixels that are object.
        cells: patch cells ``(row, col)`` with coverage > 0, row-major.
        token_indices: for each cell the index ``row * GRID + col`` of its image token within the image's
            ``GRID**2`` image tokens.
    """

    image: Image.Image = field(repr=False)
    colour: str
    shape: str
    row: int
    col: int
    position: str
    caption: str
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]
    mask: np.ndarray = field(repr=False)
    bbox: tuple[int, int, int, int]
    coverage: np.ndarray = field(repr=False)
    cells: tuple[tuple[int, int], ...]
    token_indices: tuple[int, ...]

    def words(self) -> set[str]:
        """The colour and shape synonyms that name this object (see ``SYNONYMS``).

        Example:
            >>> "crimson" in make_scene(0, colour="red").words()
            True
        """
        return set(SYNONYMS[self.colour]) | set(SYNONYMS[self.shape])


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + float(rad * np.cos(a)), cy - float(rad * np.sin(a))) for a, rad in zip(angles, radii)]
    return None


def _draw_mask(shape: str, cx: int, cy: int, r: int) -> np.ndarray:
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        s = round(r * 0.85)  # a square's area close to the circle's
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape in ("triangle", "star"):
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas) > 0


def make_scene(
    seed: int | np.random.Generator,
    *,
    colour: str | None = None,
    shape: str | None = None,
    position: tuple[int, int] | str | None = None,
) -> Scene:
    """Draw one image: a shape of one colour at one of nine positions, with small size/place/colour jitter.

    Args:
        seed: an int (used as ``np.random.default_rng(seed)``) or a ``np.random.Generator`` (advanced in place).
        colour: force the colour (a key of ``COLOURS``); random when None.
        shape: force the shape (one of ``SHAPES``); random when None.
        position: force the cell, as ``(row, col)`` or a phrase of ``POSITIONS``; random when None.

    Returns:
        A :class:`Scene` (image 96 × 96 RGB uint8, mask, box, patch coverage, caption).

    Raises:
        ValueError: an unknown colour, shape or position.

    Example:
        >>> s = make_scene(7, colour="red", shape="circle", position="top left")
        >>> s.caption, s.cells[0]
        ('a red circle at the top left.', (0, 0))
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    # draw every random number in a fixed order so forcing one attribute leaves the others' draws unchanged
    c_i, s_i, p_i = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES))), int(rng.integers(9))
    radius = int(rng.integers(_RADIUS_RANGE[0], _RADIUS_RANGE[1] + 1))
    u = rng.random(2)
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    grey = int(rng.integers(_BACKGROUND_RANGE[0], _BACKGROUND_RANGE[1] + 1))

    colour = list(COLOURS)[c_i] if colour is None else colour
    shape = SHAPES[s_i] if shape is None else shape
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if position is None:
        row, col = divmod(p_i, 3)
    elif isinstance(position, str):
        found = [rc for rc, phrase in POSITIONS.items() if phrase == position]
        if not found:
            raise ValueError(f"unknown position {position!r}; expected one of {tuple(POSITIONS.values())}")
        row, col = found[0]
    else:
        row, col = (int(v) for v in position)
        if (row, col) not in POSITIONS:
            raise ValueError(f"position {position!r} is not a (row, col) cell of the 3 x 3 layout")

    # centre such that [c - r, c + r] stays inside the cell with a 1 px margin
    lo, span = radius + 1, CELL - 2 * radius - 2
    cx = col * CELL + lo + int(round(u[0] * span))
    cy = row * CELL + lo + int(round(u[1] * span))
    mask = _draw_mask(shape, cx, cy, radius)

    rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255))
    background = (grey, grey, grey)
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[...] = background
    pixels[mask] = rgb
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    coverage = mask.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).mean(axis=(1, 3)).astype(np.float32)
    cells = tuple((int(r), int(c)) for r, c in zip(*np.nonzero(coverage > 0)))
    position_phrase = POSITIONS[(row, col)]
    return Scene(
        image=Image.fromarray(pixels, "RGB"),
        colour=colour,
        shape=shape,
        row=row,
        col=col,
        position=position_phrase,
        caption=CAPTION_TEMPLATE.format(
            article="an" if colour[0] in "aeiou" else "a", colour=colour, shape=shape, position=position_phrase
        ),
        rgb=rgb,  # type: ignore[arg-type]
        background=background,
        mask=mask,
        bbox=bbox,
        coverage=coverage,
        cells=cells,
        token_indices=tuple(r * GRID + c for r, c in cells),
    )


def make_scenes(n: int, seed: int = 0, *, stream: int = 0) -> list[Scene]:
    """``n`` independent random scenes; scene ``i`` depends only on ``(seed, stream, i)``, not on ``n``.

    Training draws from ``stream=0`` (batch ``b`` = scenes of stream ``1000 + b``, see ``train.py``);
    held-out evaluation uses another ``seed`` *and* ``stream=1``, so its images never repeat training images
    bit for bit (the 216 attribute combinations do repeat, with other jitter).

    Args:
        n: number of scenes (≥ 0).
        seed: the seed.
        stream: an independent sub-stream of the same seed.

    Returns:
        list of :class:`Scene`.

    Example:
        >>> [s.caption for s in make_scenes(2, seed=1)] == [s.caption for s in make_scenes(3, seed=1)[:2]]
        True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_scene(np.random.default_rng([seed, stream, i])) for i in range(n)]


def token_cell(index: int) -> tuple[int, int]:
    """The patch cell ``(row, col)`` covered by image token ``index`` (0 ≤ index < ``GRID**2``), row-major.

    Raises:
        IndexError: index out of range.

    Example:
        >>> token_cell(7)
        (1, 1)
    """
    if not 0 <= index < GRID * GRID:
        raise IndexError(f"image token index {index} outside 0..{GRID * GRID - 1}")
    return divmod(int(index), GRID)


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> dict[str, str | None]:
    """Read colour, shape and position back from a (generated) caption.

    The first colour word and the first shape word (canonical names only, not synonyms) are taken; the
    position is the longest phrase of ``POSITIONS`` found in the text, so ``"middle left"`` wins over
    ``"left"``-like partial matches and ``"center"`` alone means the middle cell.

    Args:
        text: any string.

    Returns:
        ``{"colour": str | None, "shape": str | None, "position": str | None}`` (None where absent).

    Example:
        >>> parse_caption("A Red star at the bottom center.")
        {'colour': 'red', 'shape': 'star', 'position': 'bottom center'}
    """
    low = text.lower()
    words = _WORD.findall(low)
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    joined = " ".join(words)
    found = [p for p in POSITIONS.values() if re.search(rf"\b{p}\b", joined)]
    position = max(found, key=len) if found else None
    return {"colour": colour, "shape": shape, "position": position}
