"""Dubbing, shared by `dheads dub` (Ray Data, jobs/dub.py) and `dheads serve` (serve/).

Read in this order:

- `segments`: pure numpy, no I/O. Cut an item's audio into `Segment`s at
  quiet frames (`segment_item`), a `Segment` to and from a flat row
  (`to_row` / `from_row`, for Ray Data), and back: `stitch` the generated
  segments with cross-fades and rebuild the item's audio (`assemble`).
- `items`: the item type `DubItem`, its result `DubResult` / `ItemStatus`,
  and its media I/O: `prepare_item` (decode identity + audio once, crop,
  segment) and `finish_item` (stitch, H.264 + AAC, atomic write).
- `engine`: `ContinuousBatcher`, the queue of segments over the model's
  `FrameLoop` (continuous batching), and `build_engine` (checkpoint ->
  engine, through `platform.modelfetch.fetch_model_checkpoint`).
"""
