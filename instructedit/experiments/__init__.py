"""Experiments and studies that train editors (resumable): Table 3, Table 1 (cross-task transfer), task scaling, ConvSent balance."""
