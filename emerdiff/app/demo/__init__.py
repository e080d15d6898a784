"""The browser demo: one photo in, the four panels of EmerDiff out (Gradio, an optional extra).

    pip install -e ".[demo]"
    python tools/demo.py --cfg configs/tiny.yaml          # then open http://127.0.0.1:7860

Three modules, so the segmentation can be used (and tested) without a browser:

- `uploads`: an upload checked and read as a photo (`read_upload`), or a `DemoInputError` for the page.
- `segmenter`: `DemoSegmenter` segments one upload per call with the visitor's K and lambda on SD
  components loaded once, names the masks through the prediction writer's extras contract
  (`emerdiff.predict.ExtrasStep`, e.g. `ovseg.any_vocab.AnyVocabulary`), and writes the downloads
  through the prediction outputs (`OutputStore`, the COCO export).
- `page`: the Gradio page (`build_demo`, `serve`) and its pictures.
"""
