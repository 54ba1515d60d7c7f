"""A layer's tar stream turned into files: the pure whiteout and path rules (``layerplan``) and the
unpacker that applies them. Below the drivers, which name its whiteout modes.
"""
