"""Terminal tables: no wider than asked, the long column wrapped, extra columns left out and named."""

import pandas as pd
import pytest

from carclf.core.console import constant_values, fit_table

TABLE = pd.DataFrame({"model": ["svm_rbf", "simple_cnn"], "val_f1_macro": [0.83712, float("nan")],
                      "test accuracy": ["0.807 ± 0.051 [0.696, 0.904]", "0.319 ± 0.130 [0.237, 0.408]"],
                      "configuration": ["kernel=rbf, C=24.97, gamma=0.0002264, augment_strength=0",
                                        "lr=0.00338, epochs=6, batch_size=32, augment_strength=0.3"]})


@pytest.mark.parametrize("width", [80, 120, 200])
def test_a_table_fits_and_keeps_every_word_of_the_wrapped_column(width):
    text = fit_table(TABLE, width=width, wrap="configuration")
    assert max(map(len, text.splitlines())) <= width
    for config in TABLE["configuration"]:
        for word in config.split():
            assert word in text
    assert "0.8371" in text and "nan" not in text.lower()  # 4 significant digits; missing is blank


def test_columns_are_left_out_last_first_until_the_wrapped_one_has_room_and_the_table_says_so():
    text = fit_table(TABLE, width=50, wrap="configuration", optional=["val_f1_macro", "test accuracy"])
    assert "test accuracy" not in text.splitlines()[0] and "val_f1_macro" in text.splitlines()[0]
    assert text.splitlines()[-1] == "(test accuracy: left out to fit the terminal)"
    assert max(map(len, text.splitlines())) <= 50


def test_numbers_align_right_and_text_left():
    header, first, second = fit_table(TABLE[["model", "val_f1_macro"]], width=100).splitlines()
    assert header.index("val_f1_macro") + len("val_f1_macro") == len(first)  # right edge of the number
    assert first.startswith("svm_rbf ") and second.startswith("simple_cnn")


def test_constant_values_ignore_missing_entries():
    df = pd.DataFrame({"epochs": [6, None, 6], "lr": [0.1, 0.2, None], "backbone": [None, None, None]})
    assert constant_values(df, ["epochs", "lr", "backbone", "absent"]) == {"epochs": "6"}
