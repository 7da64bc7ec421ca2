"""The learned video codec (SPEC section 3): networks, entropy models, bitstream, video I/O, anchors, metrics.

Needs the ``codec`` extra (``pip install 'bitalloc[codec]'``): PyAV (video I/O and the x265 anchor),
constriction (entropy coding), bjontegaard (BD-rate cross-check), OpenCV (motion estimation, saliency).
"""
