"""The registered model as a serving user meets it, and `ratchet predict`.

A registered version is an MLflow pyfunc model whose loader is `ratchet.serve.pyfunc` (code of
the installed package, never code stored in the registry) over a data folder holding:

- `model.pt2`: the network with its preprocessing baked in (models.serving), in torch.export's
  format, which loads as tensors and a graph: nothing is unpickled;
- `serving.json`: what the family needs to read named inputs and name its outputs (feature
  columns, image size and channels, class names, the series' frequency and window).

Its signature names the inputs (feature columns, `image` as base64-encoded file bytes, the
series' timestamp and value columns) and the outputs (`label`, `probability`, `prob_<class>`;
forecasts: `step`, timestamp, value). `mlflow models serve --env-manager local` and
`mlflow.pyfunc.load_model(...).predict(DataFrame)` answer with class names.
"""
