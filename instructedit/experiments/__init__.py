"""Experiments and studies that train editors (resumable): Table 3, task scaling, ConvSent balance."""
