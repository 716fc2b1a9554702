"""The trained model: its checkpoint record, the one loader, the forward pass with test-time views, user inputs,
the `Predictor`, and the task object that says what outputs mean (`SingleLabel`)."""
