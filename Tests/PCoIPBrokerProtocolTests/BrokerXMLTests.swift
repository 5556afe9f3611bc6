import PCoIPBrokerProtocol
import Testing
import TestSupport

@Suite("Broker XML: a strict, bounded reader", .offPool)
struct BrokerXMLTests {
    func parse(_ text: String, limits: BrokerXML.Limits = .standard) throws(BrokerXML.ParseError) -> BrokerXML.Element {
        try BrokerXML.parse(Array(text.utf8), limits: limits)
    }

    func refusal(_ text: String, limits: BrokerXML.Limits = .standard) -> String? {
        do throws(BrokerXML.ParseError) {
            _ = try parse(text, limits: limits)
            return nil
        } catch {
            return error.description
        }
    }

    @Test("elements, attributes, text, entities, character references, CDATA, comments")
    func accepted() throws {
        let doc = try parse("""
            \u{FEFF}<?xml version="1.0" encoding="UTF-8"?>
            <!-- a comment before -->
            <root a="1" b='two &amp; &quot;three&quot;'>
              <child>x &lt; y &#65;&#x42; <![CDATA[<raw> & stuff]]></child>
              <empty/>
              <!-- inside -->
              <child>second</child>
            </root>
            <!-- after -->
            """)
        #expect(doc.name == "root")
        #expect(doc.attribute("a") == "1")
        #expect(doc.attribute("b") == "two & \"three\"")
        #expect(doc.children.map(\.name) == ["child", "empty", "child"])
        #expect(doc.children[0].text == "x < y AB <raw> & stuff")
        #expect(doc.children("child").count == 2)
        #expect(doc.childText("child") == "x < y AB <raw> & stuff")
        #expect(doc.child("empty")?.text == "")
    }

    @Test("writing and reading back gives the same tree, escapes included")
    func roundTrip() throws {
        let tree = BrokerXML.Element("pcoip-broker", attributes: [.init("version", "2.1"), .init("note", "a \"b\" <c> & d\nline")],
                                     children: [.leaf("x", "1 < 2 & 3 > 2"), BrokerXML.Element("empty"), .leaf("y", "ünïcødé\r\n")])
        let bytes = BrokerXML.serialize(tree)
        #expect(try BrokerXML.parse(bytes) == tree)
    }

    @Test("refused, by name: DTDs, entity declarations, undefined entities, processing instructions")
    func dangerous() {
        #expect(refusal("<!DOCTYPE x><x/>")?.contains("DTD") == true)
        #expect(refusal("<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaa\">]><x>&a;</x>")?.contains("DTD") == true)
        #expect(refusal("<x>&a;</x>")?.contains("not defined") == true)
        #expect(refusal("<x>&xxe SYSTEM;</x>") != nil)
        #expect(refusal("<?php echo 1 ?><x/>")?.contains("processing instructions") == true)
        #expect(refusal("<x><?pi?></x>")?.contains("processing instructions") == true)
        #expect(refusal("<x><!ELEMENT y ANY></x>")?.contains("declarations") == true)
        #expect(refusal("<x>&#0;</x>")?.contains("not a valid XML character") == true)
        #expect(refusal("<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><x/>")?.contains("only UTF-8") == true)
    }

    @Test("refused: not well-formed, with where")
    func malformed() {
        #expect(refusal("")?.contains("no root element") == true)
        #expect(refusal("text")?.contains("text before the root") == true)
        #expect(refusal("<a><b></a>")?.contains("</a> closes <b>") == true)
        #expect(refusal("<a>")?.contains("not closed") == true)
        #expect(refusal("<a/><b/>")?.contains("after the root") == true)
        #expect(refusal("<a x=1/>")?.contains("not quoted") == true)
        #expect(refusal("<a x='1' x='2'/>")?.contains("given twice") == true)
        #expect(refusal("<a x='1'y='2'/>")?.contains("whitespace") == true)
        #expect(refusal("<a x='<'/>") != nil)
        #expect(refusal("<a>]]></a>") != nil)
        #expect(refusal("<a><!-- open</a>")?.contains("comment") == true)
        #expect(refusal("<1a/>")?.contains("expected a name") == true)
        var bad: [UInt8] = Array("<a>".utf8)
        bad += [0xFF, 0xFE]
        bad += Array("</a>".utf8)
        #expect(throws: BrokerXML.ParseError.self) { try BrokerXML.parse(bad) }
    }

    @Test("bounded: size, depth, element count, attributes, names")
    func bounded() {
        let limits = BrokerXML.Limits(maxBytes: 200, maxDepth: 4, maxElements: 10, maxAttributesPerElement: 2, maxNameBytes: 8)
        #expect(refusal(String(repeating: " ", count: 201) + "<a/>", limits: limits)?.contains("larger than 200 bytes") == true)
        #expect(refusal("<a><b><c><d><e/></d></c></b></a>", limits: limits)?.contains("deeper than 4") == true)
        #expect(refusal("<a>" + String(repeating: "<b/>", count: 10) + "</a>", limits: limits)?.contains("more than 10 elements") == true)
        #expect(refusal("<a x='1' y='2' z='3'/>", limits: limits)?.contains("more than 2 attributes") == true)
        #expect(refusal("<abcdefghij/>", limits: limits)?.contains("longer than 8") == true)
        // A million nested elements cannot exhaust the stack.
        let deep = String(repeating: "<a>", count: 100_000)
        #expect(refusal(deep)?.contains("larger than") == true || refusal(deep)?.contains("deeper") == true)
    }

    @Test("an entity never expands beyond its own bytes (no billion laughs)")
    func noExpansion() throws {
        let text = "<x>" + String(repeating: "&amp;", count: 1000) + "</x>"
        let doc = try parse(text)
        #expect(doc.text.utf8.count == 1000)
    }
}
