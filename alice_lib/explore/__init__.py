"""Exploring the rate by hand (``notebooks/06_explore.ipynb``): one image, one slider, JPEG at the same bytes.

Why: the first question a reader of ALICE asks is what a given rate looks like, how the
image degrades as the adapters move from the anchor towards the lowest trained lambda,
and how that compares with JPEG at the same size. The notebook is a few cells; the work
is here, and all of it runs (and is tested) without a widget front end.

A :class:`View` is one position of the controls, everything in it measured on real files:

* the image coded into an ``.alice`` file (:func:`alice_lib.codec.encode`, the tiles
  ``alice compress`` makes) at a control value ``ln(lambda)`` in either mode of
  :class:`~alice_lib.codec.RateControl` (``interpolate`` or CALICE-style ``alpha``), and
  decoded from its bitstreams (:func:`alice_lib.codec.decode`): what a receiver sees;
* JPEG 4:4:4 with the evaluation's options (:data:`~alice_lib.evaluation.CLASSICAL_CODECS`)
  at the largest quality whose whole file is no larger than the whole ``.alice`` file, header
  included (:func:`largest_quality_within`); when even quality 1 is larger, quality 1, with
  :attr:`JpegMatch.fits` False;
* PSNR and MS-SSIM of both (:func:`alice_lib.evaluation.metrics.image_quality`);
* a crop, the user's or where the decoded image's squared error is largest
  (:func:`largest_error_box`);
* the point (bpp, PSNR, MS-SSIM) over the RD curves of the last evaluated run
  (``runs/<profile>/eval``) or, when there is none, of the committed ``reports/<profile>/``
  (:func:`rd_reference`); its bpp counts the bitstreams, as the curves' learned points do.

Responsive on a CPU (:class:`Explorer`): the model and adapters are loaded once and
shared by both modes (a move rewrites the adapted layers in place: 1 to 5 ms measured for
the CPU model), every JPEG quality's size is measured once per image and scale, and
views are kept per (mode, control, scale). While the slider moves a downscaled preview is
coded; the full image once it rests (:class:`Debounce`). The widgets
(:class:`ExplorerPanel`) are a thin layer over :class:`Explorer`.

Modules: :mod:`.core` (the picture, the rate control, the JPEG ladder, the crop, the RD
reference, :class:`View` and :class:`Explorer`), :mod:`.drawing` (the matplotlib figures
and PNG bytes) and :mod:`.panel` (the widgets and :class:`Debounce`).
"""

from .core import (DEFAULT_IMAGE, JPEG_QUALITIES, Box, Explorer, JpegLadder, JpegMatch, Picture, RdReference, View,
                   box_around, downscale, largest_error_box, largest_quality_within, load_explorer,
                   load_rate_control, open_picture, rd_reference)
from .drawing import RD_METHODS, RdPicture, draw_view, figure_png, image_png
from .panel import Debounce, ExplorerPanel

__all__ = ["DEFAULT_IMAGE", "JPEG_QUALITIES", "RD_METHODS", "Picture", "open_picture", "load_rate_control",
           "downscale", "largest_quality_within", "JpegMatch", "JpegLadder", "Box", "largest_error_box",
           "box_around", "RdReference", "rd_reference", "View", "Explorer", "load_explorer", "draw_view",
           "figure_png", "image_png", "RdPicture", "Debounce", "ExplorerPanel"]
