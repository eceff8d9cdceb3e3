"""The client SDK builds image parts from bytes, file paths and dicts (no server needed)."""

import pytest
from attnserve_client.request import generate_request, score_request
from attnserve_client.v1 import inference_service_pb2 as pb


def test_content_lists_become_text_and_image_parts(tmp_path):
    image_file = tmp_path / "cat.png"
    image_file.write_bytes(b"\x89PNG file bytes")
    request = generate_request(
        "tiny-llava",
        messages=[
            {"role": "system", "content": "be brief"},
            ("user", [image_file, "and", b"raw bytes", {"image": image_file}, {"text": "what?"}]),
        ],
    )
    system, user = request.chat.messages
    assert system == pb.ChatMessage(role="system", content="be brief")
    assert [p.WhichOneof("part") for p in user.parts] == ["image", "text", "image", "image", "text"]
    assert user.parts[0].image == user.parts[3].image == b"\x89PNG file bytes"
    assert user.parts[2].image == b"raw bytes" and user.parts[4].text == "what?"
    score = score_request("tiny-llava", ["yes"], messages=[("user", [b"img", "is it red?"])])
    assert [p.WhichOneof("part") for p in score.chat.messages[0].parts] == ["image", "text"]


def test_bad_parts():
    with pytest.raises(ValueError, match="exactly one key"):
        generate_request("m", messages=[("user", [{"image": b"x", "text": "y"}])])
    with pytest.raises(TypeError, match="encoded bytes or a file path"):
        generate_request("m", messages=[("user", [3.5])])


def test_visual_recipes_from_dicts_and_messages():
    from attnserve_client.v1 import visual_recipe_pb2 as vpb

    messages = [("user", [b"img", "what is it?"])]
    default = generate_request("tiny-llava", messages=messages, carve={})
    assert default.WhichOneof("visual_recipe") == "carve" and default.carve == vpb.CarveRecipe()
    tuned = generate_request("tiny-llava", messages=messages, carve={"top_fraction": 0.3, "layers": [2]})
    assert tuned.carve.top_fraction == pytest.approx(0.3) and list(tuned.carve.layers) == [2]
    funnel = generate_request("tiny-llava", messages=messages, visual_funnel=vpb.VisualFunnelRecipe(crops=2))
    assert funnel.WhichOneof("visual_recipe") == "visual_funnel" and funnel.visual_funnel.crops == 2
    with pytest.raises(ValueError, match="at most one visual recipe"):
        generate_request("m", messages=messages, carve={}, visual_funnel={})
